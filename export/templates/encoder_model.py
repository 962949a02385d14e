"""Triton Python-backend model: runs the exported ONNX graph in ONNX Runtime.

Copied by ``imgsearch export`` to ``<repository>/<model>/1/model.py`` and selected with
``tritonserver --model-config-name cpu``. Dynamic batching hands ``execute`` several
requests at once: they are stacked into one ONNX Runtime call and split back. A request
that is malformed gets its own error response; the rest of the batch still runs.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

if int(np.__version__.split(".")[0]) >= 2:
    # With numpy 2 the stub's as_numpy() returns wrong values and numpy-built outputs
    # arrive empty, with no error (see DESIGN.md). Refuse to load rather than serve garbage.
    raise RuntimeError(
        f"numpy {np.__version__} in the Triton Python-backend environment corrupts tensors; "
        "install numpy<2 in the environment whose python3 is first on the server's PATH"
    )


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "0") or 0)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args.get("model_instance_device_id", 0))}))
        self.session = ort.InferenceSession(path, opts, providers=providers)
        self.input = config["input"][0]
        self.input_shape = tuple(int(d) for d in self.input["dims"])
        self.output_names = [o["name"] for o in config["output"]]
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self.output_names if n not in graph_outputs]
        if missing:
            raise RuntimeError(f"config outputs {missing} are not in {path} (graph has {sorted(graph_outputs)})")
        self.logger = pb_utils.Logger
        self.logger.log_info(f"loaded {path} with {self.session.get_providers()[0]}, outputs {self.output_names}")

    def _check(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, self.input["name"])
        if tensor is None:
            raise ValueError(f"missing input {self.input['name']!r}")
        arr = tensor.as_numpy()
        if arr.dtype != np.uint8:
            raise ValueError(f"input must be uint8, got {arr.dtype}")
        if arr.ndim != 4 or tuple(arr.shape[1:]) != self.input_shape or arr.shape[0] == 0:
            raise ValueError(f"input shape must be [N, {', '.join(map(str, self.input_shape))}], got {list(arr.shape)}")
        return arr

    def execute(self, requests):
        responses = [None] * len(requests)
        arrays, owners = [], []
        for i, request in enumerate(requests):
            try:
                arrays.append(self._check(request))
                owners.append(i)
            except ValueError as e:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        if arrays:
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            try:
                outputs = self.session.run(self.output_names, {self.input["name"]: batch})
            except Exception as e:  # noqa: BLE001 - report per request, keep serving
                for i in owners:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"inference failed: {e}"))
            else:
                start = 0
                for i, arr in zip(owners, arrays):
                    end = start + arr.shape[0]
                    responses[i] = pb_utils.InferenceResponse(
                        [pb_utils.Tensor(name, np.ascontiguousarray(out[start:end]))
                         for name, out in zip(self.output_names, outputs)])
                    start = end
        return responses

    def finalize(self):
        self.session = None
