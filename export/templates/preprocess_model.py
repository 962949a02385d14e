"""Triton Python-backend model ``preprocess``: encoded image files -> uint8 RGB pixels.

The first step of the ``image_search`` ensemble (file bytes in, embedding out), so a
client sends the file as it is (several times fewer bytes than pixels) and decodes
nothing. Copied by ``imgsearch export`` to ``<repository>/preprocess/1/model.py``.

Input ``image_bytes`` BYTES [N, 1]; output ``images`` UINT8 [N, size, size, 3], the same
plain resize to ``size x size`` as :func:`imgsearch.imaging.decode_image`.

``decoder`` parameter: ``pillow`` (configs/cpu.pbtxt) or ``torchvision`` (configs/gpu.pbtxt);
what each does is in ``preprocess_decoder.py``, copied beside this file.

A file that cannot be used gets its own error response (INVALID_ARG) carrying the typed
error's code and message (``imgsearch:<code>: ...``, mapped back to the same exception by
``TritonEncoder.encode_bytes``); the other requests of the batch go on. A request of
several files fails as a whole when one of them is bad (the message says which).

The stub must see the ``imgsearch`` package (installed in the environment whose python3
is first on the server's PATH) and numpy<2: with numpy 2 the stub crashes on BYTES inputs
(checked here with tritonserver 2.51: "Stub process is not healthy").
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    from imgsearch.imaging import DEFAULT_MAX_PIXELS
    from imgsearch.model_card import BYTES_INPUT as INPUT
except ImportError as e:  # pragma: no cover - a deployment error, said plainly
    raise ImportError(
        f"the preprocess model needs the imgsearch package in the Triton stub's Python ({e}); "
        "pip install the project into the environment whose python3 is first on tritonserver's PATH"
    ) from None

from .preprocess_decoder import DECODE_MEMORY_BYTES, Decoder, error_message

OUTPUT = "images"


class TritonPythonModel:
    def initialize(self, args):
        if int(np.__version__.split(".")[0]) >= 2:
            raise RuntimeError(
                f"numpy {np.__version__} in the Triton Python-backend environment: the stub crashes on BYTES "
                "inputs with numpy 2; install numpy<2 in the environment whose python3 is first on the server's PATH")
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        kind = args.get("model_instance_kind", "CPU")
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        if params.get("device", "auto") == "cuda":  # a KIND_CPU instance decoding on GPU 0
            kind = "GPU"
        out = next(o for o in config["output"] if o["name"] == OUTPUT)
        size = int(params.get("size", out["dims"][0]))
        decoder = params.get("decoder", "pillow")
        device = f"cuda:{device_id}" if kind == "GPU" else "cpu"
        self.logger = pb_utils.Logger
        self.decoder = Decoder(decoder, device, size, int(params.get("max_pixels", DEFAULT_MAX_PIXELS)),
                               log=self.logger.log_warn,
                               memory_bytes=int(params.get("decode_memory_bytes", DECODE_MEMORY_BYTES)))
        self.size = size
        where = f"torchvision.io.decode_jpeg on {device}" + (" (nvJPEG)" if device != "cpu" else "")
        self.logger.log_info(f"preprocess: decoder {decoder} ({where if decoder == 'torchvision' else 'Pillow'}), "
                             f"{size}x{size}, numpy {np.__version__}")

    def execute(self, requests):
        responses = [None] * len(requests)
        blobs, spans = [], []
        for r, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT)
            arr = None if tensor is None else tensor.as_numpy()
            if arr is None or arr.size == 0:
                responses[r] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"missing or empty input {INPUT!r}", pb_utils.TritonError.INVALID_ARG))
                spans.append(None)
                continue
            items = [bytes(x) for x in arr.reshape(-1)]
            spans.append((len(blobs), len(items)))
            blobs.extend(items)
        decoded = self.decoder.decode(blobs) if blobs else []
        s = self.size
        for r, span in enumerate(spans):
            if span is None:
                continue
            start, n = span
            mine = decoded[start:start + n]
            bad = [(j, d) for j, d in enumerate(mine) if isinstance(d, Exception)]
            if bad:
                j, err = bad[0]
                responses[r] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    error_message(err, j, n), pb_utils.TritonError.INVALID_ARG))
                continue
            batch = np.empty((n, s, s, 3), np.uint8)
            for j, d in enumerate(mine):
                batch[j] = d
            responses[r] = pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT, batch)])
        return responses

    def finalize(self):
        self.decoder = None
