"""``spikegrad bench step --quick``: the report's structure and ratios, never a wall-clock time;
the peer networks (benchmarks/peers.py) against create_model's; the entry point without a checkout.

The in-process run covers every network kind; the isolated run (memory from one
subprocess per configuration) covers the memory figures; the interleaving of the
timed rounds is checked with stand-in steps. The fused backend's cold compiles are left
to test_neuron.py.
"""
import argparse
import json
import statistics

import pytest
import torch

from spikegrad import bench
from spikegrad.cli import main
from spikegrad.layers import neuron_layers
from spikegrad.models import create_model

harness = bench.load_harness()  # the checkout's benchmarks/harness.py (its directory now on sys.path)
import peers  # noqa: E402  # benchmarks/peers.py

PEERS = ["spikingjelly", "snntorch"]


def _run(out, *options):
    main(["bench", "step", "--quick", "--out", str(out), *options])
    return json.loads((out / "train_step.json").read_text()), (out / "train_step.md").read_text()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("bench"), "--in-process", "--backends", "torch", "eager")


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("bench"), "--T", "1", "--backends", "eager",
                "--peers", "spikingjelly", "--shortcut", "off")


def _rows(result):
    return {(r["net"], r["backend"], r["T"], r["shortcut"]): r for r in result["rows"]}


def _peer(result, peer, T, shortcut):
    return next(r for r in result["rows"] if (r["net"], r["T"], r["shortcut"]) == (peer, T, shortcut))


def test_every_configuration_is_measured_with_its_spread(in_process):
    result, _ = in_process
    meta = result["meta"]
    assert (meta["width"], meta["batch"], meta["T"], meta["repeats"]) == (1 / 16, 2, [1, 2], 2)
    assert result["not_measured"] == []
    expected = {("ann", "-", 1, s) for s in (False, True)}
    expected |= {("spikegrad", b, T, s) for b in ("torch", "eager") for T in (1, 2) for s in (False, True)}
    expected |= {(p, "auto" if p == "spikingjelly" else "torch", T, s) for p in PEERS for T in (1, 2)
                 for s in (False, True)}
    assert set(_rows(result)) == expected and len(result["rows"]) == len(expected)
    for r in result["rows"]:
        times = r["times_s"]
        assert len(times) == (4 if r["net"] == "ann" else 2)  # the ANN twin is timed with each T
        assert r["median_s"] == pytest.approx(statistics.median(times))
        assert (r["min_s"], r["max_s"]) == (min(times), max(times))
        assert r["q1_s"] <= r["median_s"] <= r["q3_s"]
        assert r["peak_mib"] is None and r["base_mib"] is None  # memory needs its own process


def test_peer_networks_have_the_same_parameters(in_process):
    result, _ = in_process
    for shortcut in (False, True):
        counts = {r["params"] for r in result["rows"] if r["shortcut"] == shortcut}
        assert len(counts) == 1, counts  # ANN twin, spikegrad, SpikingJelly, snnTorch: one shape
    plain, branched = (next(r["params"] for r in result["rows"] if r["shortcut"] == s) for s in (False, True))
    assert branched > plain


def _per_round(row, reference):
    """The median of ``row``'s per-round time ratios to ``reference`` (same rounds)."""
    assert len(row["times_s"]) == len(reference["times_s"])
    return statistics.median(a / b for a, b in zip(row["times_s"], reference["times_s"]))


def test_ratios_come_from_the_measured_times(in_process):
    """Against the ANN twin: ratio of medians; against a peer and shortcut / plain (timed in
    the same interleaved rounds): the median of the per-round ratios."""
    result, _ = in_process
    rows = _rows(result)
    for (net, backend, T, shortcut), r in rows.items():
        ratios = r["ratios"]
        if net != "ann":
            ann = rows[("ann", "-", 1, shortcut)]
            assert ratios["per_T_ann"] == pytest.approx(r["median_s"] / (T * ann["median_s"]))
        if net == "spikegrad":
            for peer in PEERS:
                ref = _peer(result, peer, T, shortcut)
                assert ratios[f"vs_{peer}"] == pytest.approx(_per_round(r, ref))
                assert ratios[f"memory_vs_{peer}"] is None
        if shortcut:
            plain = rows[(net, backend, T, False)]
            assert ratios["shortcut_over_plain"] == pytest.approx(_per_round(r, plain))
        else:
            assert "shortcut_over_plain" not in ratios


def _table_cells(text, title):
    """``{(net, T): {column: cell}}`` of the markdown table under ``### title``."""
    block = text.split(f"### {title}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    header = [c.strip() for c in block[0].strip("|").split("|")]
    assert set(block[1]) == {"|", "-"}
    cells = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in block[2:]]
    return {(c["net"], int(c["T"])): c for c in cells}


def test_markdown_tables_show_the_json_numbers(in_process):
    result, text = in_process
    for shortcut, title in ((False, "Without shortcut branches"), (True, "With shortcut branches")):
        table = _table_cells(text, title)
        rows = [r for r in result["rows"] if r["shortcut"] == shortcut]
        assert len(table) == len(rows)
        for r in rows:
            cells = table[(r["name"], r["T"])]
            assert cells["median ms"] == f"{r['median_s'] * 1e3:.1f}"
            assert cells["IQR ms"] == f"{(r['q3_s'] - r['q1_s']) * 1e3:.1f}"
            shown = {"SNN / (T x ANN)": "per_T_ann", "/ SpikingJelly": "vs_spikingjelly", "/ snnTorch": "vs_snntorch"}
            if shortcut:
                shown["shortcut / plain"] = "shortcut_over_plain"
            for column, key in shown.items():
                value = r["ratios"].get(key)
                assert cells[column] == ("–" if value is None else f"{value:.2f}"), (r["label"], column)


def test_isolated_runs_report_peak_rss_and_memory_ratios(isolated):
    result, text = isolated
    assert result["meta"]["isolated"] and result["not_measured"] == []
    assert [(r["net"], r["T"]) for r in result["rows"]] == [("ann", 1), ("spikegrad", 1), ("spikingjelly", 1)]
    for r in result["rows"]:
        assert 0 < r["base_mib"] <= r["peak_mib"]
        assert 0 < r["live_base_mib"] <= r["live_mib"]  # the second, allocator-neutral process
    ours, peer = result["rows"][1], result["rows"][2]
    assert ours["ratios"]["memory_vs_spikingjelly"] == pytest.approx(ours["peak_mib"] / peer["peak_mib"])
    assert ours["ratios"]["live_memory_vs_spikingjelly"] == pytest.approx(ours["live_mib"] / peer["live_mib"])
    assert ours["ratios"]["vs_snntorch"] is None  # not asked for
    cells = _table_cells(text, "Without shortcut branches")[("spikegrad eager", 1)]
    assert cells["peak MiB (before model)"] == f"{ours['peak_mib']:.0f} ({ours['base_mib']:.0f})"
    assert cells["live MiB"] == f"{ours['live_mib']:.0f}"
    assert "With shortcut branches" not in text


@pytest.mark.parametrize("options, message", [
    (["--repeats", "1"], "--repeats must be at least 2"),
    (["--model", "resnet99"], "unknown model 'resnet99'"),
    (["--T", "0"], "--T at least 1"),
])
def test_bad_options_end_in_one_line(options, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "step", "--quick", *options])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_compiled_run_compiles_both_and_names_the_peers_left_out(tmp_path):
    result, page = _run(tmp_path, "--in-process", "--compile", "--T", "1", "--backends", "torch",
                        "--peers", "spikingjelly", "--shortcut", "off")
    assert result["meta"]["compile"] is True and "--compile" in result["meta"]["command"]
    assert set(_rows(result)) == {("ann", "-", 1, False), ("spikegrad", "torch", 1, False)}
    assert [m["case"] for m in result["not_measured"]] == ["spikingjelly"]
    assert "both compiled" in page


def test_timed_rounds_interleave_each_group_and_survive_a_failing_case(monkeypatch):
    calls, released = [], []

    class Net:  # stands in for a built network: records its steps and its release
        def __init__(self, T):
            self.T = T

        def __del__(self):
            released.append(self.T)

    def fake_prepare(setup, case):
        if case.T == 3:
            raise RuntimeError("cannot build\nsecond line")
        net = Net(case.T)
        return harness.Prepared(lambda: calls.append(net.T), lambda: None, params=case.T)

    monkeypatch.setattr(harness, "prepare", fake_prepare)
    setup = harness.Setup("plain-8", 1.0, 2, repeats=2, warmup=1, device="cpu", threads=1)
    shared, a, b, bad = (harness.Case("spikegrad", "torch", T, False) for T in (1, 2, 4, 3))
    rows, failed = harness.time_interleaved(setup, [[shared, a, bad], [shared, b]])
    # group 1: warm-ups, two rounds; group 2: only b is new (shared is kept), two rounds
    assert calls == [1, 2] + [1, 2] * 2 + [4] + [1, 4] * 2
    assert released[:1] == [2]  # a's network went before b's was built
    assert [(r["T"], r["params"], len(r["times_s"])) for r in rows] == [(1, 1, 4), (2, 2, 2), (4, 4, 2)]
    assert failed == [{"case": "spikegrad torch T=3", "reason": "RuntimeError: cannot build"}]


def test_contiguous_option_is_recorded(tmp_path):
    result, page = _run(tmp_path, "--in-process", "--contiguous", "--T", "1", "--backends", "torch",
                        "--peers", "--shortcut", "off")
    assert result["meta"]["channels_last"] is False and "--contiguous" in result["meta"]["command"]
    assert "ANN twin and spikegrad contiguous" in page


def test_conv_layout_table_reports_each_map_in_both_layouts(capsys):
    args = argparse.Namespace(maps=[(4, 8), (8, 4)], rows=2, repeats=2)
    rows = harness.conv_main(args)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [(r["channels"], r["side"]) for r in rows] == [(4, 8), (8, 4)]
    for r, line in zip(rows, lines):
        assert r["ratio"] == pytest.approx(r["channels_last_s"] / r["contiguous_s"])
        assert line.strip("|").split("|")[1:] == [f" {r['contiguous_s'] * 1e3:.1f} ",
                                                   f" {r['channels_last_s'] * 1e3:.1f} ", f" {r['ratio']:.2f} "]


def test_bad_map_ends_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "conv", "--maps", "64x32"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "expected CHANNELS@SIDE such as 64@32, got '64x32'" in err and len(err.splitlines()) == 1


def test_a_failed_memory_run_keeps_the_times_and_says_why(tmp_path, monkeypatch):
    def fake_memory(setup, case):
        if case.net == "spikegrad":
            raise RuntimeError("MemoryError: out of memory")
        return {"peak_mib": 100.0, "base_mib": 50.0, "live_mib": 90.0, "live_base_mib": 50.0}

    monkeypatch.setattr(harness, "memory_isolated", fake_memory)
    result, text = _run(tmp_path, "--T", "1", "--backends", "torch", "--peers", "--shortcut", "off")
    ann, ours = result["rows"]
    assert (ann["peak_mib"], ours["peak_mib"], len(ours["times_s"])) == (100.0, None, 2)
    assert result["not_measured"] == [{"case": "spikegrad torch T=1 (memory)", "reason": "MemoryError: out of memory"}]
    assert _table_cells(text, "Without shortcut branches")[("spikegrad torch", 1)]["peak MiB (before model)"] == "–"


def _spikegrad_reference(name, **kwargs):
    torch.manual_seed(0)
    return create_model(name, 10, backend="torch", channels_last=False, **kwargs)


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_peer_networks_are_create_models_network_with_the_peers_layers(name):
    """Same parameter names, shapes and values as spikegrad's network; SpikingJelly's
    multi-step net gives the very same outputs in training, snnTorch's per-step net in
    evaluation (in training its batch norm sees one step's batch; a threshold of 0.9 keeps
    exact ties away, where snnTorch's Heaviside is strict and the others' is not)."""
    from snntorch import Leaky
    from spikingjelly.activation_based import layer, neuron as sjn

    kwargs = {"T": 2, "width": 1 / 16, "neuron": {"v_threshold": 0.9}}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for peer, kinds, mode in (("spikingjelly", (sjn.LIFNode, layer.Conv2d, layer.BatchNorm2d), "train"),
                              ("snntorch", (Leaky,), "eval")):
        ref = getattr(_spikegrad_reference(name, **kwargs), mode)()
        torch.manual_seed(0)
        net = getattr(peers.peer_model(peer, name, 10, **kwargs), mode)()
        params = {n.removeprefix("model."): p for n, p in net.named_parameters()}
        assert params.keys() == dict(ref.named_parameters()).keys()
        assert all(torch.equal(params[n], p) for n, p in ref.named_parameters())
        assert neuron_layers(net) == [] and all(any(isinstance(m, k) for m in net.modules()) for k in kinds)
        logits, stages = ref(x, return_stages=True)
        for _ in range(2):  # the second call after the peer's own reset
            peer_logits, peer_stages = net(x, return_stages=True)
        torch.testing.assert_close(peer_logits, logits, msg=lambda m, peer=peer: f"{peer}: {m}")
        for peer_spikes, spikes in zip(peer_stages, stages, strict=True):
            torch.testing.assert_close(peer_spikes, spikes, msg=lambda m, peer=peer: f"{peer}: {m}")


def test_peer_networks_take_only_what_their_neurons_express():
    with pytest.raises(ValueError, match="LIF neurons with an ATan surrogate"):
        peers.peer_model("spikingjelly", "resnet20", T=1, width=1 / 16, neuron={"type": "plif"})
    with pytest.raises(ValueError, match="snnTorch's Leaky takes undecayed input"):
        peers.peer_model("snntorch", "resnet20", T=1, width=1 / 16, neuron={"decay_input": True})


def test_without_a_source_checkout_bench_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "site-packages" / "spikegrad" / "bench.py"))
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "conv", "--maps", "4@8", "--rows", "2", "--repeats", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "spikegrad bench needs a source checkout" in err and len(err.splitlines()) == 1


def test_spike_conv_modes_are_rows_with_their_ratio_to_dense_convs_and_the_density(tmp_path):
    result, text = _run(tmp_path, "--in-process", "--T", "2", "--backends", "torch", "--peers",
                        "--shortcut", "off", "--spike-conv", "auto", "off")
    rows = {(r["backend"], r["spike_conv"]): r for r in result["rows"] if r["net"] == "spikegrad"}
    assert set(rows) == {("torch", "auto"), ("torch", "off")}
    auto, off = rows[("torch", "auto")], rows[("torch", "off")]
    assert auto["ratios"]["vs_dense_convs"] == pytest.approx(_per_round(auto, off))
    assert "vs_dense_convs" not in off["ratios"]
    assert (auto["name"], off["name"]) == ("spikegrad torch", "spikegrad torch, dense convs")
    density = result["meta"]["spike_density"]["2"]
    assert 0 < density < 1 and f"T=2 {density:.3f}" in text
    assert "--spike-conv auto off" in result["meta"]["command"]


def test_spike_table_reports_every_spike_convolution_at_every_density(tmp_path, capsys):
    import spike_bench  # benchmarks/spike_bench.py

    args = argparse.Namespace(model="resnet20", width=0.25, T=1, batch=2, image=32, densities=[0.1, 0.3],
                              repeats=2, threads=None, out=str(tmp_path))
    spike_bench.main(args)
    counts, _ = spike_bench.spike_conv_shapes("resnet20", 0.25, 1, 2)
    convs = [m for m in create_model("resnet20", 10, T=1, width=0.25).modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(counts.values()) == len(convs) - 1  # every conv but the image's
    rows = json.loads((tmp_path / "spike_conv.json").read_text())
    assert len(rows) == 2 * len(counts)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "->" in line]
    for row, line in zip(rows, lines, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{row['density']:g}"
        assert cells[4] == f"{row['forward'] / row['spike forward']:.2f}"
        assert cells[5] == f"{row['weight'] / row['spike weight']:.2f}"


def test_supported_limits_are_the_largest_density_up_to_which_every_eligible_conv_wins():
    import spike_bench  # benchmarks/spike_bench.py

    wide = spike_bench.ConvShape(64, 64, 8, 3, 1, 1)
    pointwise = spike_bench.ConvShape(64, 128, 8, 1, 2, 0)  # 1x1: the rule keeps it dense
    narrow = spike_bench.ConvShape(16, 64, 8, 3, 1, 1)  # under MIN_CHANNELS: dense too
    densities = [0.1, 0.2, 0.3]
    spike = {"forward": {0.1: 1, 0.2: 2.7, 0.3: 2.8}, "weight": {0.1: 1, 0.2: 4, 0.3: 2}}  # dense takes 3
    times = {}
    for shape in (wide, pointwise, narrow):
        for d in densities:
            for product in ("forward", "weight"):
                times[(shape, d, product)] = 3.0
                times[(shape, d, f"spike {product}")] = spike[product][d] if shape == wide else 9.0
    limits = spike_bench.supported_limits([wide, pointwise, narrow], densities, times)
    assert limits == {"forward": 0.2, "weight": 0.1}  # 3 / 2.8 is under the margin; the weight's
    # win at 0.3 comes after a loss
    assert spike_bench.supported_limits([wide, pointwise, narrow], densities, times, margin=1.0)["forward"] == 0.3
    times[(wide, 0.1, "spike forward")] = 5.0
    assert spike_bench.supported_limits([wide, pointwise, narrow], densities, times)["forward"] == 0.0
    assert spike_bench.supported_limits([pointwise, narrow], densities, times) == {"forward": 0.0, "weight": 0.0}
