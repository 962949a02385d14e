// Swagger UI for /openapi.json; a file (not inline) because the CSP allows scripts from 'self' only.
window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
