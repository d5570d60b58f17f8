"""A local client's CUDA tensors by CUDA IPC, the parts that run without a GPU: the wire, the checks,
the coordinator's slicing, and the client's choice between CUDA IPC and host memory (the mapping
itself runs in tests/gpu/test_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from core.codec import client_codec, coordinator_client_codec
from core.cuda_ipc import CudaIpcHandle, CudaRef
from core.errors import BadInput, ProtocolError
from core.messages import HelloReply, SubmitJob
from core.tensors import (
    NO_TENSORS,
    TensorMeta,
    TensorTree,
    check_buffers,
    decode_tensors,
    slice_rows,
)
from scheduler import client_core
from scheduler.client_core import CUDA_IPC_MIN_BYTES, Call, ClientCore, as_outputs

HANDLE = CudaIpcHandle(0, b"\x01" * 64, 1 << 22, 512, b"\x02" * 16, 8, b"\x03" * 64, True)


def cuda_tree(rows: int = 4, cols: int = 8, offset: int = 1024) -> TensorTree:
    return TensorTree("tensor", (TensorMeta("float32", (rows, cols)),), cuda=(CudaRef(HANDLE, "GPU-abc", offset),))


def test_a_cuda_tree_carries_no_frames_and_survives_the_wire() -> None:
    tree = cuda_tree()
    assert tree.frames == 0
    frames = client_codec().encode(SubmitJob(5, "infer", "m/0", tree, NO_TENSORS), [])
    message, buffers = coordinator_client_codec().decode(frames)
    assert buffers == [] and message.inputs == tree


def test_checks_count_a_cuda_trees_bytes_and_refuse_a_mismatch() -> None:
    assert check_buffers(cuda_tree(4, 8), [], 1 << 20) == 4 * 8 * 4
    with pytest.raises(BadInput, match="exceed"):
        check_buffers(cuda_tree(4, 8), [], 64)
    two = TensorTree("tuple", (TensorMeta("float32", (2,)), TensorMeta("float32", (2,))),
                     cuda=(CudaRef(HANDLE, "GPU-abc", 0),))
    with pytest.raises(ProtocolError, match="CUDA places"):
        check_buffers(two, [], 1 << 20)


def test_rows_of_a_cuda_tree_are_its_offset_moved_on() -> None:
    tree, buffers = slice_rows(cuda_tree(4, 8, offset=1024), [], 1, 3)
    assert buffers == [] and tree.metas[0].shape == (2, 8)
    assert tree.cuda[0].offset == 1024 + 1 * 8 * 4 and tree.cuda[0].handle == HANDLE


def test_a_cuda_tree_the_worker_did_not_map_fails_with_a_clear_error() -> None:
    with pytest.raises(BadInput, match="shm=False"):
        decode_tensors(cuda_tree(), [])


@pytest.mark.parametrize(("asked", "same_host", "device", "expected"), [
    (True, True, "cuda:0", "abcd-01"), (False, True, "cuda:0", ""), (True, True, "cpu", ""),
    (True, False, "cuda:0", "")])
def test_cuda_ipc_only_when_asked_for_a_gpu_coordinator_on_this_machine(asked: bool, same_host: bool, device: str,
                                                                       expected: str) -> None:
    core = ClientCore(shm=True, cuda_ipc=asked)
    gpu = "GPU-ABCD-01" if device != "cpu" else ""  # NVML's spelling; torch's has no prefix
    core.greeted(HelloReply(1, 1, "x", 1 << 28, core.identity if same_host else "elsewhere", device, gpu))
    assert core.cuda_gpu == expected


def gpu_call(x: torch.Tensor, op: str = "infer") -> Call:
    """A job whose tensors the client found on a GPU (here CPU tensors stand in: no copy is made)."""
    tree = TensorTree("tensor", (TensorMeta("float32", tuple(x.shape)),))
    call = Call(op, SubmitJob(0, op, "m/0", tree, NO_TENSORS), as_outputs)
    call.gpu = ([x], [])
    call.size = x.numel() * 4
    return call


def test_a_small_gpu_call_or_one_to_a_cpu_coordinator_is_copied_to_host_memory() -> None:
    core = ClientCore(shm=True, cuda_ipc=True)
    core.greeted(HelloReply(1, 1, "x", 1 << 28, core.identity, "cpu"))
    x = torch.arange(CUDA_IPC_MIN_BYTES // 4, dtype=torch.float32)
    call = core.start(gpu_call(x), 10.0)
    assert call.gpu is None and call.kept == [] and not call.message.inputs.cuda
    assert call.message.inputs.shm or call.size == x.numel() * 4  # in the arena, or in frames
    core.finish(call)
    core.close()


def test_a_large_gpu_call_to_a_local_gpu_coordinator_goes_by_reference(monkeypatch) -> None:
    exported: list[torch.Tensor] = []

    def refs(tree: TensorTree, tensors: list[torch.Tensor]) -> tuple[TensorTree, list[torch.Tensor]]:
        exported.extend(tensors)
        return TensorTree(tree.layout, tree.metas, tree.keys, cuda=(CudaRef(HANDLE, "GPU-abc", 0),)), list(tensors)

    monkeypatch.setattr(client_core, "to_cuda_refs", refs)
    monkeypatch.setattr(ClientCore, "_on_workers_gpu", lambda self, tensors: True)
    core = ClientCore(shm=True, cuda_ipc=True)
    core.greeted(HelloReply(1, 1, "x", 1 << 28, core.identity, "cuda:0", "GPU-abc"))
    x = torch.zeros(CUDA_IPC_MIN_BYTES // 4)
    call = core.start(gpu_call(x), 10.0)
    assert call.buffers == [] and call.message.inputs.cuda and exported == [x]
    assert call.kept == [x]  # alive until the reply
    core.finish(call)
    assert call.kept == []
    # A group call is mapped by one worker per part, more readers than torch counts: through the host.
    ensemble = core.start(gpu_call(x, "ensemble"), 10.0)
    assert not ensemble.message.inputs.cuda and exported == [x]
    core.finish(ensemble)
    core.close()


def test_tensors_on_another_gpu_than_the_workers_go_through_host_memory(monkeypatch) -> None:
    monkeypatch.setattr(client_core, "to_cuda_refs", lambda tree, tensors: pytest.fail("exported"))
    monkeypatch.setattr(ClientCore, "_on_workers_gpu", lambda self, tensors: False)
    core = ClientCore(shm=False, cuda_ipc=True)
    core.cuda_gpu = "abc"
    call = core.start(gpu_call(torch.zeros(CUDA_IPC_MIN_BYTES // 4)), 10.0)
    assert not call.message.inputs.cuda and len(call.buffers) == 1


def test_memory_torch_cannot_export_goes_through_host_memory(monkeypatch) -> None:
    def refuse(tree: TensorTree, tensors: list[torch.Tensor]) -> tuple[TensorTree, list[torch.Tensor]]:
        raise RuntimeError("no IPC for this allocator")

    monkeypatch.setattr(client_core, "to_cuda_refs", refuse)
    monkeypatch.setattr(ClientCore, "_on_workers_gpu", lambda self, tensors: True)
    core = ClientCore(shm=False, cuda_ipc=True)
    core.cuda_gpu = "abc"
    x = torch.ones(CUDA_IPC_MIN_BYTES // 4)
    call = core.start(gpu_call(x), 10.0)
    assert not call.message.inputs.cuda and len(call.buffers) == 1 and call.size == x.numel() * 4


def test_gpu_uuids_compare_as_torch_and_nvml_write_them() -> None:
    from core.cuda_ipc import normal_uuid

    assert normal_uuid("GPU-5B1C-AA") == normal_uuid("5b1c-aa") == "5b1c-aa"
