"""Every kind of bad input gets its typed error, and the system stays up."""

from __future__ import annotations

import subprocess
import sys
import time

import msgspec
import pytest
import torch
import zmq
from cohort_harness import ROOT, config_text, mlp_group
from fixture_models import group

from core.codec import PROTOCOL_VERSION, client_codec
from core.messages import ListModels
from scheduler import BadInput, ConfigError, JobFailed, ProtocolError, UnknownModel


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    from cohort_harness import start_cohort

    tmp = tmp_path_factory.mktemp("bad")
    r = start_cohort(tmp, [mlp_group("mlp", 2), group("faulty", "faulty")], workers=1,
                     max_message_bytes=1 << 20)
    yield r
    r.close()


def still_serving(running) -> None:
    with running.client(timeout=10) as c:
        assert c.infer("mlp/0", torch.randn(2, 8)).shape == (2, 4)


@pytest.mark.parametrize("model", ["nope/0", "mlp/2", "mlp/-1", "mlp", "mlp/x", "/0"])
def test_unknown_model_or_index(running, model) -> None:
    with running.client(timeout=10) as c, pytest.raises(UnknownModel):
        c.infer(model, torch.randn(2, 8))
    still_serving(running)


def test_unknown_group_for_ensemble(running) -> None:
    with running.client(timeout=10) as c, pytest.raises(UnknownModel, match="no group"):
        c.ensemble("cnn", torch.randn(2, 8))


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (torch.randn(2, 9), "shape"),
        (torch.randn(8), "shape"),
        (torch.randn(2, 8, dtype=torch.float64), "dtype"),
        (torch.ones(2, 8, dtype=torch.int64), "dtype"),
        ({"y": torch.randn(2, 8)}, "one tensor"),
        ((torch.randn(2, 8), torch.randn(2, 8)), "one tensor"),
        (torch.randn(0, 8), "empty"),
    ],
)
def test_wrong_input(running, inputs, match) -> None:
    with running.client(timeout=10) as c, pytest.raises(BadInput, match=match):
        c.infer("mlp/1", inputs)
    still_serving(running)


def test_not_a_tensor(running) -> None:
    with running.client(timeout=10) as c, pytest.raises(BadInput):
        c.infer("mlp/1", [1.0, 2.0])


@pytest.mark.parametrize(
    ("target", "match"),
    [
        (torch.randn(4), "probabilities"),                  # float target must match the output's shape
        (torch.zeros(4, 2, dtype=torch.int64), "class indices"),  # indices of the wrong shape
        (torch.tensor([0, 1, 2, 9]), "class"),              # index out of range for 4 classes
        (torch.tensor([0, 1]), "batch"),                    # batch mismatch
        (None, "needs targets"),
    ],
)
def test_target_that_does_not_fit_the_loss(running, target, match) -> None:
    with running.client(timeout=10) as c, pytest.raises(BadInput, match=match):
        c.train_step("mlp/0", torch.randn(4, 8), target)
    still_serving(running)


def test_train_round_takes_a_shared_batch_or_one_stacked_per_model(running) -> None:
    with running.client(timeout=10) as c:
        assert len(c.train_round("mlp", torch.randn(4, 8), torch.zeros(4, dtype=torch.int64))) == 2  # shared
        with pytest.raises(BadInput, match="stacked"):  # stacked, but 3 rows for the group's 2 models
            c.train_round("mlp", torch.randn(3, 4, 8), torch.zeros(3, 4, dtype=torch.int64))
        with pytest.raises(BadInput, match="target batch size"):  # a shared batch with stacked targets
            c.train_round("mlp", torch.randn(4, 8), torch.zeros(2, 4, dtype=torch.int64))


def test_exception_inside_the_model_is_job_failed(running) -> None:
    with running.client(timeout=10) as c:
        with pytest.raises(JobFailed, match="too hot"):
            c.infer("faulty/1", torch.full((2, 4), 5000.0))
        assert c.infer("faulty/1", torch.ones(2, 4)).shape == (2, 4)


def test_message_over_the_size_bound(running) -> None:
    big = torch.randn(300_000, 8)  # 9.6 MB, bound is 1 MiB
    with running.client(timeout=10) as c, pytest.raises(BadInput, match="bound"):
        c.infer("mlp/0", big)  # the client learns the coordinator's bound and refuses before sending
    still_serving(running)


def test_coordinator_refuses_a_message_over_its_bound(running) -> None:
    # A client that skips the check (another implementation, an old version) is refused too.
    from core.messages import SubmitJob
    from core.tensors import encode_tensors

    tree, buffers = encode_tensors(torch.randn(40_000, 8))  # 1.28 MB: over the bound, under the socket's limit
    s = raw_socket(running)
    try:
        s.send_multipart(client_codec().encode(SubmitJob(5, "infer", "mlp/0", tree), buffers))
        reply = decode_reply(s.recv_multipart())
        assert (reply.req_id, reply.error) == (5, "BadInput") and "bound" in reply.message
    finally:
        s.close()
    still_serving(running)


def raw_socket(running) -> zmq.Socket:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(running.address)
    return s


def decode_reply(frames):
    reply, _ = client_codec().decode(frames)
    return reply


@pytest.mark.parametrize(
    "frames",
    [
        [b"\x00garbage"],
        [b""],
        [bytes([PROTOCOL_VERSION, 1]) + b"\xff" * 10],
        [bytes([PROTOCOL_VERSION, 0]) + b"\xc1\xc1\xc1"],
        [bytes([PROTOCOL_VERSION, 0]) + msgspec.msgpack.encode(["NoSuchMessage", 7])],
        [bytes([PROTOCOL_VERSION, 0]) + msgspec.msgpack.encode(["SubmitJob", 7, 3, None])],
        [bytes([PROTOCOL_VERSION, 7]) + b"x", b"y", b"z"],
        [bytes([PROTOCOL_VERSION + 1, 0]) + msgspec.msgpack.encode(["ListModels", 1])],
    ],
    ids=["bad-version", "empty", "bad-table", "bad-msgpack", "unknown-type", "wrong-fields",
         "unknown-layout", "newer-version"],
)
def test_malformed_bytes_and_unknown_types_get_protocol_error(running, frames) -> None:
    s = raw_socket(running)
    try:
        s.send_multipart(frames)
        reply = decode_reply(s.recv_multipart())
        assert reply.error == "ProtocolError", reply
        # The same connection still works afterwards.
        s.send_multipart(client_codec().encode(ListModels(42)))
        assert decode_reply(s.recv_multipart()).req_id == 42
    finally:
        s.close()
    still_serving(running)


def test_frame_over_the_socket_limit_drops_only_that_peer(running) -> None:
    s = raw_socket(running)
    try:
        s.send_multipart([bytes([PROTOCOL_VERSION, 0]) + b"\x00" * (8 << 20)])
        time.sleep(0.5)
    finally:
        s.close()
    still_serving(running)


@pytest.mark.parametrize(
    ("coordinator", "group_overrides", "key"),
    [
        ({"workers": 0}, {}, "coordinator.workers"),
        ({"wrkers": 2}, {}, "wrkers"),
        ({"device": "tpu"}, {}, "coordinator.device"),
        ({"mps": "maybe"}, {}, "coordinator.mps"),
        ({}, {"count": 0}, "count"),
        ({}, {"optimizer": {"name": "sgd", "lr": [0.1, 0.2, 0.3]}}, "lr"),
        ({}, {"loss": "hinge"}, "loss"),
        ({}, {"input": {"shape": [-1, 8], "dtype": "float13"}}, "dtype"),
        ({}, {"factory": "examples.models:nope"}, "factory"),
        ({}, {"input": {"shape": [-1, 9], "dtype": "float32"}}, "input"),
    ],
)
def test_bad_config_names_the_key(tmp_path, coordinator, group_overrides, key) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(config_text({"address": f"ipc://{tmp_path}/c.sock", "device": "cpu", **coordinator},
                                [{**mlp_group("mlp", 2), **group_overrides}]))
    proc = subprocess.run([sys.executable, "-m", "scheduler", "run", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "ConfigError" in proc.stderr and key in proc.stderr, proc.stderr


def test_load_config_error_is_config_error(tmp_path) -> None:
    from scheduler.config import load_config

    path = tmp_path / "x.toml"
    path.write_text("[coordinator\nworkers = 2\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_protocol_error_class_is_public() -> None:
    assert issubclass(ProtocolError, Exception)


def test_rejected_jobs_are_counted_by_error(running) -> None:
    with running.client(timeout=10) as c:
        before = c.stats()["jobs"]
        with pytest.raises(UnknownModel):
            c.infer("nope/0", torch.randn(2, 8))
        with pytest.raises(BadInput):
            c.infer("mlp/0", torch.randn(2, 3))
        after = c.stats()["jobs"]
    assert after["rejected"] == before["rejected"] + 2
    assert after["rejected_errors"].get("UnknownModel", 0) == before["rejected_errors"].get("UnknownModel", 0) + 1
    assert after["submitted"] == before["submitted"]
