"""Metrics writer: JSONL + TensorBoard records, throughput/MFU arithmetic, per-domain values, host-0 only."""

import glob
import json
import struct
import time

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from glmv_jax.train.metrics import MetricsWriter, flatten_metrics, measure_peak_flops


def read_scalars(path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            event = event_pb2.Event.FromString(f.read(length))
            f.read(4)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_jsonl_tensorboard_and_mfu(tmp_path):
    with MetricsWriter(tmp_path, total_steps=4, flops_per_token=1e6, peak_flops=1e9, progress=True,
                       domain_names=["math", "ocr"], is_host0=True) as writer:
        for step in (1, 2, 3):
            time.sleep(0.02)
            written = writer.write(step, {"loss": np.float32(2.0 / step), "lr": 1e-3, "tokens": 100.0,
                                          "domain_loss_sum": np.array([1.5, 2.5]), "ignored": np.zeros((2, 2))})
            assert written["tokens_per_s"] == pytest.approx(100.0 * written["steps_per_s"])
            assert written["mfu"] == pytest.approx(1e6 * written["tokens_per_s"] / 1e9)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert lines[1]["loss"] == 1.0 and lines[2]["domain_loss_sum/ocr"] == 2.5
    assert not any(key.startswith("ignored") for key in lines[0])
    assert 0 < lines[2]["tokens_per_s"] < 100.0 / 0.02
    scalars = read_scalars(glob.glob(str(tmp_path / "events.out.tfevents.*"))[0])
    assert scalars["loss"] == [(1, 2.0), (2, 1.0), (3, pytest.approx(2 / 3))]
    assert scalars["domain_loss_sum/math"] == [(1, 1.5), (2, 1.5), (3, 1.5)] and len(scalars["mfu"]) == 3


def test_not_host0_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "logs", total_steps=3, is_host0=False)
    assert writer.write(1, {"loss": 1.0}) is None
    writer.close()
    assert not (tmp_path / "logs").exists()


def test_seq_tokens_drive_throughput_and_peak_measure(tmp_path):
    with MetricsWriter(tmp_path, total_steps=2, progress=False, is_host0=True) as writer:
        writer.write(1, {"tokens": 10.0, "seq_tokens": 64.0})
        record = writer.write(3, {"tokens": 10.0, "seq_tokens": 64.0})
    assert record["tokens_per_s"] == pytest.approx(64.0 * record["steps_per_s"])
    assert measure_peak_flops(n=64, repeats=1) > 0


def test_flatten_and_bad_values():
    assert flatten_metrics({"a": np.array(3, np.int32), "b": np.array([1.0, 2.0])}) == {"a": 3.0, "b/0": 1.0, "b/1": 2.0}
    with pytest.raises(ValueError, match="peak_flops"):
        MetricsWriter("/nonexistent", total_steps=1, peak_flops=0.0, is_host0=False)
