"""``spikegrad train | eval | export | plot | bench | ablation | list``.

Bad input (config, paths, datasets, checkpoints, shapes) ends in one line on stderr
and exit code 2; nothing already written is touched (docs/reliability.md). A run that
cannot go on (non-finite loss or weights) ends in one line and exit code 1; Ctrl-C in
one line and exit code 130.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

__all__ = ["main"]


def _cmd_train(args: argparse.Namespace) -> None:
    import yaml

    from .config import ConfigError, load_config, to_dict
    from .train import Trainer, last_checkpoint

    if args.resume:
        if args.config:
            raise ValueError("--resume takes the run directory's own config; drop --config")
        if args.overwrite:
            raise ValueError("--resume continues a run and --overwrite starts it afresh; pass one")
        if Path(args.resume).is_symlink():
            raise ConfigError(f"run directory {args.resume!r} is a symbolic link; resume the real directory")
        run_dir = Path(os.path.normpath(os.path.abspath(args.resume)))
        last_checkpoint(run_dir)  # before reading its config.yaml, for the clearer message
        cfg = load_config(run_dir / "config.yaml", args.set)
        cfg.out, cfg.name = str(run_dir.parent), run_dir.name
    else:
        if args.allow_change:
            raise ValueError("--allow-change only concerns --resume")
        cfg = load_config(args.config, args.set)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return
    trainer = Trainer(cfg, resume=bool(args.resume), overwrite=args.overwrite, allow_change=args.allow_change)
    if not args.resume and args.config is None and cfg.name == "code-defaults":
        print("spikegrad: no --config: training the code defaults as run 'code-defaults' "
              "(`spikegrad train --config configs/default.yaml` is the documented default run; "
              "see `spikegrad list configs`)", file=sys.stderr, flush=True)
    summary = trainer.fit()
    if summary["final_acc"] is None:  # not rank 0 of a distributed run
        return
    best = f"{summary['best_acc']:.2f}%" if summary["best_acc"] >= 0 else "none"
    print(f"final test accuracy {summary['final_acc']:.2f}% (best {best})")
    print(f"run directory: {summary['run_dir']}")


def _repo_configs() -> list[Path]:
    """Folders that may hold the project's configs/: the current directory's and the source
    checkout's (beside src/)."""
    here = Path(__file__).resolve().parents[2] / "configs"
    return list(dict.fromkeys([Path.cwd() / "configs", here]))


def _listing(kind: str) -> list[str]:
    if kind == "models":
        from .models import list_models
        return list_models()
    if kind == "surrogates":
        from .surrogate import SURROGATES
        return SURROGATES.names()
    if kind == "neurons":
        from .layers import NEURONS
        return NEURONS.names()
    if kind == "methods":
        from .methods import METHODS
        return METHODS.names()
    if kind == "losses":
        from .losses import LOSSES
        return LOSSES.names()
    if kind == "datasets":
        from .data import DATASETS
        return DATASETS.names()
    for folder in _repo_configs():
        if folder.is_dir():
            return [str(p.relative_to(folder.parent)) for p in sorted(folder.rglob("*.yaml"))]
    raise FileNotFoundError(f"no configs/ folder in {' or '.join(str(p) for p in _repo_configs())} "
                            "(the configs ship with the source checkout)")


LIST_KINDS = ("models", "surrogates", "neurons", "methods", "losses", "datasets", "configs")


def _cmd_list(args: argparse.Namespace) -> None:
    for name in _listing(args.kind):
        print(name)


def _cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from . import monitor
    from .checkpoint import load_inference_model
    from .data import create_dataset, make_loader
    from .train import evaluate

    if Path(args.checkpoint).suffix == ".nir":
        from . import losses
        from .nir import from_nir

        try:
            model = from_nir(args.checkpoint)
        except (ValueError, OSError):
            raise
        except (KeyError, TypeError, IndexError, AttributeError, RecursionError, OverflowError) as err:
            # the file's contents drive the reader: an error here is the file's
            raise ValueError(f"{args.checkpoint!r} is not a readable NIR graph "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        if model.T is None:
            raise ValueError(f"{args.checkpoint!r} states no time_steps/encoding in its metadata; "
                             "eval needs a .nir written by spikegrad export")
        objective, state = losses.create("ce", model.T), {"model_kwargs": {"T": model.T}}
    else:
        model, objective, state = load_inference_model(args.checkpoint)
    data = state.get("config", {}).get("data", {})
    name = args.data or data.get("name", "fashion-mnist")
    root = args.root if args.root is not None else (data.get("root") if not args.data else None)
    T = state["model_kwargs"].get("T", 1)
    dataset = create_dataset(name, root, "test", T=T, limit=args.limit)
    loader = make_loader(dataset, args.batch_size, shuffle=False, seed=0, epoch=0)
    device = torch.device("cpu")
    with monitor.FiringRates(model) as rates:
        result = evaluate(model, loader, objective, device)
    with monitor.SynapticOps(model) as ops, torch.no_grad():
        model(next(iter(loader))[0][:32])
    summary = ops.summary()
    print(f"test accuracy: {result['acc']:.2f}% on {len(dataset)} {name} images "
          f"(loss {result['loss']:.4f})")
    run_limit = data.get("limit_test") if "config" in state and not args.data else None
    if run_limit is not None and args.limit is None:  # then dataset is the whole test set
        run_limit = min(run_limit, len(dataset))
    if run_limit is not None and run_limit != len(dataset):
        print(f"  the run's own test accuracy (metrics.jsonl, report.md) used the first {run_limit} "
              f"images (data.limit_test); this eval used {len(dataset)}")
    elif "config" in state and run_limit is None and args.limit is not None and not args.data:
        print(f"  the run's own test accuracy (metrics.jsonl, report.md) used the whole test set; "
              f"this eval used the first {len(dataset)} (--limit)")
    layer_name = getattr(model, "layer_name", str)  # a .nir: the exported model's own layer names
    for layer, rate in rates.rates().items():
        print(f"  firing rate {layer_name(layer)}: {rate:.4f}")
    overall = rates.overall()
    if overall is not None:
        print(f"  firing rate, all neurons: {overall:.4f}")
    print(f"synaptic operations per sample: {summary['sops']:.4g} SOPs + {summary['macs']:.4g} MACs "
          f"(ANN twin: {summary['ann_macs']:.4g} MACs)")


def _cmd_export(args: argparse.Namespace) -> None:
    from . import checkpoint
    from .checkpoint import load_inference_model, model_file

    out = Path(args.out)
    if out.suffix not in (".pt", ".nir"):
        raise ValueError(f"export format is chosen by the suffix; expected .pt or .nir, got {out.name!r}")
    if out.is_dir():
        raise IsADirectoryError(21, "is a directory; give a file name", str(out))
    if out.exists() and out.resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"{str(out)!r} is the checkpoint being exported; write the model elsewhere")
    if (out.exists() or out.is_symlink()) and not args.force:
        raise FileExistsError(17, "exists; pass --force to overwrite it", str(out))
    model, objective, state = load_inference_model(args.checkpoint)
    if out.suffix == ".nir":
        import warnings

        from .nir import export_nir

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_nir(model, out, dt=args.dt, input_size=args.input_size)
        for warning in caught:
            print(f"spikegrad: warning: {warning.message}", file=sys.stderr)
        print(f"wrote {out} (NIR graph, batch norm folded, dt={args.dt:g}, T={model.T})")
        return
    checkpoint.save(model_file(model, state["model_name"], state["model_kwargs"], objective), out)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters())} parameters)")


def _cmd_plot(args: argparse.Namespace) -> None:
    from . import plots

    if len(args.run_dirs) == 1:
        for path in plots.plot_run(args.run_dirs[0]):
            print(f"wrote {path}")
        return
    out = Path(args.out or Path(args.run_dirs[0]).parent / "compare.png")
    print(f"wrote {plots.plot_compare(args.run_dirs, out)}")


def _channels_at_side(text: str) -> tuple[int, int]:
    """``"64@32"`` -> ``(64, 32)``."""
    try:
        channels, side = (int(part) for part in text.split("@"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CHANNELS@SIDE such as 64@32, got {text!r}") from None
    if channels < 1 or side < 1:
        raise argparse.ArgumentTypeError(f"channels and side must be positive, got {text!r}")
    return channels, side


def _cmd_bench(args: argparse.Namespace) -> None:
    from . import bench

    if args.kind is None:  # `spikegrad bench` is `spikegrad bench step` with its defaults
        args = _parser().parse_args(["bench", "step"])
    bench.main(args)


def _cmd_ablation(args: argparse.Namespace) -> None:
    from . import ablation

    ablation.main(args)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block): ``prog: error: what``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    from .kernels.spike_conv import MODES as SPIKE_CONV_MODES
    from .neuron import BACKENDS
    parser = _Parser(prog="spikegrad", description="Train deep spiking neural "
                     "networks with surrogate gradients and shortcut back-propagation.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model (see configs/)")
    train.add_argument("--config", help="YAML config file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set optim.lr=0.05 (repeatable)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last.pt")
    train.add_argument("--overwrite", action="store_true", help="start an existing run afresh")
    train.add_argument("--allow-change", action="store_true",
                       help="with --resume: accept --set overrides that change what the run computes "
                            "(model, T, seed, data, optimiser...); they are recorded in metrics.jsonl")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config (YAML) and exit without training")
    train.epilog = ("Without --config the code defaults train as run 'code-defaults'; `make train` "
                    "runs configs/default.yaml. See `spikegrad list configs` for every config, "
                    "`spikegrad list models|surrogates|neurons|methods|losses|datasets` for the "
                    "names a key takes, and --print-config for what a command line resolves to.")
    train.set_defaults(func=_cmd_train)
    ev = sub.add_parser("eval", help="accuracy, firing rates and SOPs of a checkpoint")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", help="dataset name (default: the run's)")
    ev.add_argument("--root", help="dataset folder")
    ev.add_argument("--limit", type=int, help="evaluate on the first N test items")
    ev.add_argument("--batch-size", type=int, default=500)
    ev.set_defaults(func=_cmd_eval)
    ex = sub.add_parser("export", help="write the inference-only model")
    ex.add_argument("checkpoint")
    ex.add_argument("out", help="output file: .pt (spikegrad model) or .nir (NIR graph)")
    ex.add_argument("--dt", type=float, default=1e-4,
                    help="time step the NIR neuron parameters are written for (default 1e-4: what "
                         "snnTorch's and SpikingJelly's importers assume; another value warns)")
    ex.add_argument("--force", action="store_true", help="overwrite an existing output file")
    ex.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                    help="image size for .nir (default 28x28 for 1 channel, else 32x32)")
    ex.set_defaults(func=_cmd_export)
    pl = sub.add_parser("plot", help="draw a run's plots, or compare several runs")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("--out", help="comparison PNG (with several runs)")
    pl.set_defaults(func=_cmd_plot)
    be = sub.add_parser("bench", help="training-step (default) or neuron benchmarks, side by side "
                        "with SpikingJelly and snnTorch")
    be.set_defaults(func=_cmd_bench)
    kinds = be.add_subparsers(dest="kind", metavar="{step,neuron,conv,spikes}")
    st = kinds.add_parser("step", help="forward+backward+optimizer step of a CIFAR network: ANN twin, "
                          "spikegrad per T and backend, peers; time, peak memory, ratios")
    st.add_argument("--model", default="resnet18", help="registry name, for every network (default resnet18)")
    st.add_argument("--width", type=float, help="channel multiplier (default 1; --quick 1/16)")
    st.add_argument("--batch", type=int, help="batch size (default 32; --quick 2)")
    st.add_argument("--T", type=int, nargs="+", help="time steps (default 1 2 4 6; --quick 1 2)")
    st.add_argument("--backends", nargs="*", choices=BACKENDS[1:],
                    help="spikegrad neuron backends (default torch eager fused, and triton on CUDA)")
    st.add_argument("--peers", nargs="*", default=["spikingjelly", "snntorch"],
                    choices=["spikingjelly", "snntorch"], help="peer libraries (default both; none: --peers)")
    st.add_argument("--shortcut", choices=["both", "off", "on"], default="both",
                    help="with and/or without shortcut branches (default both)")
    st.add_argument("--spike-conv", nargs="+", choices=SPIKE_CONV_MODES, default=["auto"],
                    help="spikegrad's convolutions of spikes (create_model spike_conv), one row per mode "
                         "(default auto; add off for the dense reference)")
    st.add_argument("--repeats", type=int, help="timed steps per configuration (default 5; --quick 2)")
    st.add_argument("--warmup", type=int, help="untimed steps first, compiling included (default 2; --quick 1)")
    st.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    st.add_argument("--threads", type=int, help="torch CPU threads (default torch's; --quick 1: a shared "
                    "machine makes several threads wait on each other)")
    st.add_argument("--compile", action="store_true",
                    help="torch.compile the ANN twin and spikegrad's networks (peers are not measured)")
    st.add_argument("--contiguous", action="store_true",
                    help="build the ANN twin and spikegrad's networks contiguous instead of channels-last")
    st.add_argument("--in-process", action="store_true",
                    help="no memory subprocesses (faster; no memory figures)")
    st.add_argument("--quick", action="store_true", help="tiny model for tests: the --quick defaults above")
    st.add_argument("--out", metavar="DIR", help="write DIR/train_step.md and DIR/train_step.json")
    ne = kinds.add_parser("neuron", help="forward+backward of one multi-step LIF layer per backend, "
                          "beside SpikingJelly's LIFNode")
    ne.add_argument("--shape", type=int, nargs="+", default=[4, 32, 64, 32, 32], help="[T, B, ...]")
    ne.add_argument("--repeats", type=int, default=20)
    co = kinds.add_parser("conv", help="a 3x3 conv's forward+backward per map size, contiguous against "
                          "channels-last")
    co.add_argument("--maps", type=_channels_at_side, nargs="+", default=[(64, 32), (128, 16), (256, 8), (512, 4)],
                    metavar="C@H", help="channels @ map side (default: CIFAR ResNet-18's 64@32 128@16 256@8 512@4)")
    co.add_argument("--rows", type=int, default=128, help="batch rows, T x batch (default 128 = 4 x 32)")
    co.add_argument("--repeats", type=int, default=7)
    sp = kinds.add_parser("spikes", help="every convolution of spikes in a model: dense against the "
                          "spike path (kernels.spike_conv) per spike density")
    sp.add_argument("--model", default="resnet18", help="registry name (default resnet18)")
    sp.add_argument("--width", type=float, default=1.0)
    sp.add_argument("--T", type=int, default=4)
    sp.add_argument("--batch", type=int, default=32)
    sp.add_argument("--image", type=int, default=32, help="input side (default 32; Fashion-MNIST 28)")
    sp.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
    sp.add_argument("--out", metavar="DIR", help="write DIR/spike_conv.md and DIR/spike_conv.json")
    from .ablation import add_arguments as ablation_arguments  # no torch import

    ab = sub.add_parser("ablation", help="several methods over several seeds of one config: "
                        "mean ± std table and comparison plot")
    ablation_arguments(ab)
    ab.set_defaults(func=_cmd_ablation)
    ls = sub.add_parser("list", help="registered names: models, surrogates, neurons, methods, losses, "
                        "datasets; or the configs/ files")
    ls.add_argument("kind", choices=LIST_KINDS)
    ls.set_defaults(func=_cmd_list)
    return parser


def _one_line(err: BaseException) -> str:
    """The first line of an error's message, naming the file of an OSError."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}"
    if isinstance(err, MemoryError) or _is_allocation_error(err):
        return f"out of memory ({str(err).splitlines()[0] if str(err) else 'MemoryError'}); try a smaller " \
               "batch_size, model.width or model.T"
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return first if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {first}"


def _is_allocation_error(err: BaseException) -> bool:
    """torch's failed allocations (a RuntimeError, or torch.OutOfMemoryError on GPUs)."""
    text = str(err)
    return isinstance(err, RuntimeError) and (type(err).__name__ == "OutOfMemoryError"
                                              or "can't allocate memory" in text
                                              or "out of memory" in text.lower())


# PyTorch's own switch: CPU tensors of 2 MiB and more are backed by transparent huge pages
# (madvise), so a large tensor mapped afresh faults once per 2 MiB instead of once per 4 KiB:
# a CIFAR ResNet-18 step at T=4 made ~28,000 page faults instead of ~265,000, ran ~8% faster
# and peaked 11-16% lower on an AMD host (docs/performance.md, changelog 2026-12-02). The
# command sets it unless the environment already does ("0" turns it off).
HUGE_PAGES = ("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``spikegrad`` console script.

    Exit codes: 0 done; 1 training stopped (non-finite loss or weights, one line); 2 bad
    input or environment, one line: a ValueError (config, dataset, checkpoint: every
    reader turns what a file holds into one), an OSError (missing file, disk full,
    read-only or unwritable place, a directory where a file was expected), an overflow,
    running out of memory; 130 interrupted. Any other exception is a bug in spikegrad and
    keeps its traceback.
    """
    os.environ.setdefault(*HUGE_PAGES)  # read by PyTorch at its first allocation
    args = _parser().parse_args(argv)
    from .train import TrainingError

    try:
        args.func(args)
    except TrainingError as err:
        print(f"spikegrad: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, OSError, OverflowError, MemoryError) as err:
        print(f"spikegrad: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:
        if not _is_allocation_error(err):
            raise
        print(f"spikegrad: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("spikegrad: interrupted", file=sys.stderr)
        sys.exit(130)
