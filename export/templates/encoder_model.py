"""Triton Python-backend model: the image encoder, on the CPU or the GPU.

Copied by ``imgsearch export`` to ``<repository>/<model>/1/model.py``, with the modules it
imports beside it (``encoder_engines.py``, ``encoder_torch.py``, ``encoder_parity.py``):
Triton copies nothing else, and imports this file as ``1.model``, so the relative imports
below resolve inside the version folder. The config that Triton was started with
(``--model-config-name``) picks the engine through its ``parameters``:

* ``configs/cpu.pbtxt`` (no ``engine`` parameter): the exported ONNX graph in ONNX Runtime
  on the CPU, tensors moved as numpy arrays (needs numpy<2 in the stub's environment).
* ``configs/gpu.pbtxt`` (``engine`` = ``auto``): ONNX Runtime with the TensorRT or CUDA EP
  when onnxruntime-gpu is installed; otherwise torch rebuilt from ``1/weights.pt`` (the
  same weights as the ONNX file; arch, head and embedding kind stored with them), fp16,
  channels_last, one CUDA graph per batch bucket (a batch is padded up to its bucket).
  Tensors move with DLPack, in and out, with no numpy copy; that also keeps clear of the
  stub's numpy-2 trap, so this path works with numpy 2.
* ``engine`` = ``torch`` on a CPU instance runs the same torch code in fp32 without
  graphs: that is how the tests exercise the GPU engine's code on a machine without one.
* ``device`` = ``cuda`` makes a KIND_CPU instance compute on GPU 0 anyway (a fallback for a
  server build that refuses GPU instances); default ``auto`` follows the instance kind.

At start-up the torch engine is checked against the ONNX model (ONNX Runtime on the CPU,
or an fp32 torch reference when ONNX Runtime is missing) on a few images: a min cosine
under ``parity_min_cosine`` refuses to load, and the figure is written to Triton's log.

Dynamic batching hands ``execute`` several requests at once: they are stacked into one
engine call and split back. A malformed request gets its own error; the rest still run.
"""

import json

import triton_python_backend_utils as pb_utils

from .encoder_engines import EngineContext, checked_input, create_engine


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.ctx = EngineContext.from_triton(args, config, log=pb_utils.Logger.log_info)
        self.engine = create_engine(self.ctx)
        self.engine.load()

    def execute(self, requests):
        ctx, io = self.ctx, self.engine.io
        responses = [None] * len(requests)
        arrays, owners = [], []
        for i, request in enumerate(requests):
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, ctx.input_name)
                arrays.append(checked_input(io, tensor, ctx.input_name, ctx.input_shape))
                owners.append(i)
            except ValueError as e:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        if arrays:
            try:
                outputs = self.engine.run(arrays)
            except Exception as e:  # noqa: BLE001 - report per request, keep serving
                for i in owners:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"inference failed: {e}"))
            else:
                start = 0
                for i, arr in zip(owners, arrays):
                    end = start + int(arr.shape[0])
                    tensors = [io.give(pb_utils.Tensor, name, out[start:end])
                               for name, out in zip(ctx.output_names, outputs)]
                    responses[i] = pb_utils.InferenceResponse(tensors)
                    start = end
        return responses

    def finalize(self):
        if getattr(self, "engine", None) is not None:
            self.engine.close()
            self.engine = None
