"""``tensorboard: true`` mirrors metrics.jsonl into TensorBoard event files; without the
package the run is refused before anything is written."""
import json
import sys

import pytest

from spikegrad.config import load_config
from spikegrad.train import Trainer

TINY = ["epochs=1", "data.limit_train=128", "data.limit_test=64", "model.width=0.125", "model.T=2",
        "batch_size=32", "log_every=1", "neuron.backend=eager", "tensorboard=true"]


def test_tensorboard_scalars_are_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(load_config(None, [*TINY, f"out={tmp_path}", "name=tb"]), progress=False).fit()
    run = tmp_path / "tb"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    steps = [r for r in records if r["kind"] == "step"]
    logged = events.Scalars("step/loss")
    assert [e.step for e in logged] == [r["step"] for r in steps]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in steps])
    epoch = next(r for r in records if r["kind"] == "epoch")
    assert events.Scalars("epoch/test_acc")[0].value == pytest.approx(epoch["test_acc"])
    assert any(tag.startswith("epoch/grad_norm/") for tag in events.Tags()["scalars"])


def test_tensorboard_without_the_package_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="tensorboard package is not installed"):
        Trainer(load_config(None, [*TINY, f"out={tmp_path}", "name=tb"]), progress=False)
    assert not (tmp_path / "tb").exists()
