"""UNet backends: how "the UNet on this batch at this step with this control" is run.

A backend runs :meth:`~pyinv.models.DiffusionModel.unet_forward_controlled`'s UNet call
(:meth:`Backend.run`: sample, timestep, embeddings and the step's control in; prediction and
LocalBlend's maps out). The eager and compile backends call the module with the control in
its ``cross_attention_kwargs``; the exported ones run the same call flattened to tensors
(:mod:`pyinv.backends.flat`), with the control tensors as graph inputs.

=================  ==========================================================================
name               what runs
=================  ==========================================================================
``eager``          the UNet as loaded (PyTorch eager): the reference
``compile``        ``torch.compile(unet, dynamic=False)``: one graph per batch layout and
                   control signature, traced at the first call of each; controllers then apply
                   their control at every step (``Controller.graph_static``) so one graph
                   serves all steps
``onnxruntime``    the UNet exported to ONNX (one graph per layout and control signature, kept
                   in the export cache) run by ONNX Runtime: ``pip install 'pyinv[export]'``
``tensorrt``       TensorRT engines built from those ONNX graphs (cached per GPU model and
                   TensorRT version), replayed as CUDA graphs: ``pip install 'pyinv[tensorrt]'``
                   and a CUDA GPU
=================  ==========================================================================

NTI's and PTI's gradient steps (``DiffusionModel.unet_forward_grad``) always run eager.
"""

from __future__ import annotations

from ..errors import PyinvError
from .base import Backend
from .compiled import CompileBackend
from .eager import EagerBackend
from .ort import OnnxRuntimeBackend
from .trt import TensorRTBackend

#: the backends by name
BACKENDS: dict[str, type[Backend]] = {
    "eager": EagerBackend,
    "compile": CompileBackend,
    "onnxruntime": OnnxRuntimeBackend,
    "tensorrt": TensorRTBackend,
}


def availability() -> dict[str, str | None]:
    """Backend name → why it cannot run here, or ``None`` (``pyinv info``)."""
    return {name: cls.availability() for name, cls in BACKENDS.items()}


def get_backend(backend: str | Backend | None) -> Backend:
    """A backend by name (``None``: ``eager``), or ``backend`` itself when it is one."""
    if isinstance(backend, Backend):
        return backend
    name = "eager" if backend is None else str(backend).strip().lower()
    if name not in BACKENDS:
        raise PyinvError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return BACKENDS[name]()


__all__ = [
    "BACKENDS",
    "Backend",
    "availability",
    "CompileBackend",
    "EagerBackend",
    "OnnxRuntimeBackend",
    "TensorRTBackend",
    "get_backend",
]
