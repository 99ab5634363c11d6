"""The ``sparse-ft`` command. Bad input exits with status 2 and one line on stderr, no traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import UserError


class _DefaultsHelp(argparse.HelpFormatter):
    """Help that shows an option's default where it has one (not None, not a switch's False) and its help
    does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if action.option_strings and not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsHelp)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _option(text: str) -> tuple[str, object]:
    """``key=value`` with value parsed as JSON when it is JSON (numbers, true/false, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_run_arguments(p: argparse.ArgumentParser, training: bool = True) -> None:
    """Flags shared by every command that builds a tuned model on a task; ``training`` adds the ones that
    only a command that trains uses."""
    p.add_argument("--task", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--sparsity", type=float, help="p: the fraction of backbone parameters that may change")
    p.add_argument("--model", default="minilm", help="'minilm' (embedded default), a hub id or a local path")
    p.add_argument("--data-dir", help="DIR/<task>/{train,val,test}.jsonl; default $SPARSE_FT_DATA, else the hub")
    p.add_argument("--seed", type=int, default=0, help="data order and dropout (and head, mask unless given)")
    p.add_argument("--head-seed", type=int)
    p.add_argument("--mask-seed", type=int)
    p.add_argument("--train-limit", type=int, help="use a seeded subset of N training examples")
    p.add_argument("--max-length", type=int, help="tokens per example (default: the preset's, 128 for cpu)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--option", "-o", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. -o scope=global (see `sparse-ft methods`)")
    p.add_argument("--preset", default="cpu",
                   help="training protocol: cpu (small), converge (to a stationary point on 32 examples), "
                        "paper (DESIGN §4)")
    if not training:
        return
    p.add_argument("--max-steps", type=int)
    p.add_argument("--eval-limit", type=int, help="score only the first N val and test examples")
    p.add_argument("--lr", type=float)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (CUDA graphs and fused AdamW on CUDA, length buckets); "
                        "default: the preset's (paper: on CUDA only). Matches eager only with dropout off: "
                        "compiled dropout draws from its own random stream")


def spec_from_args(args):
    from .experiments.run import RunSpec

    overrides = {k: getattr(args, k, None) for k in ("max_steps", "batch_size", "lr", "eval_every", "max_length")}
    if getattr(args, "compile", None) is not None:
        overrides["compile"] = "on" if args.compile else "off"
    return RunSpec(
        task=args.task, method=args.method, sparsity=args.sparsity, model=args.model, data_dir=args.data_dir,
        seed=args.seed, head_seed=args.head_seed, mask_seed=args.mask_seed, preset=args.preset,
        train_overrides={k: v for k, v in overrides.items() if v is not None},
        method_options=dict(args.option), train_limit=args.train_limit, eval_limit=getattr(args, "eval_limit", None),
        device=args.device, mask_path=getattr(args, "mask", None),
    )


def cmd_train(args) -> None:
    from .experiments.results import summary_line
    from .experiments.run import execute

    spec = spec_from_args(args)  # execute checks it (and builds its method config) before any work
    result = execute(spec, progress=not args.quiet, log=lambda msg: print(msg, file=sys.stderr),
                     output=args.output, save_model=args.save_model)
    print(summary_line(result))


def cmd_evaluate(args) -> None:
    from .experiments.results import write_json_atomic
    from .experiments.saved import evaluate_run

    out = evaluate_run(args.run, split=args.split, data_dir=args.data_dir, device=args.device)
    if args.json:
        write_json_atomic(Path(args.json), out)
    print(f"{out['task']} {out['method']} at A(S), {out['split']} ({out['examples']} examples): "
          f"score {out['score']:.2f} (major metric x100)")


def cmd_export(args) -> None:
    from .experiments.saved import load_run, read_result, run_spec
    from .export import export_peft, export_transformers
    from .models import load_tokenizer, resolve_model_path

    tuned = load_run(args.run, device="cpu")
    base = resolve_model_path(run_spec(read_result(args.run)).model)
    if args.format == "peft":
        export_peft(tuned, args.output, base)
        print(f"peft adapter written to {args.output}: PeftModel.from_pretrained("
              f"AutoModelForSequenceClassification.from_pretrained({base!r}, num_labels=N), {args.output!r})")
    else:
        export_transformers(tuned, args.output, load_tokenizer(base))
        print(f"transformers folder written to {args.output}: AutoModelFor...from_pretrained({args.output!r})")


def cmd_analyze(args) -> None:
    from .experiments.analyze import AnalyzeSettings, analyze_runs

    settings = AnalyzeSettings(examples=args.examples, lanczos_steps=args.lanczos_steps, starts=args.starts,
                               space=args.space, device=args.device)
    summary = analyze_runs(args.runs, settings, jobs=args.jobs, progress=not args.quiet, redo=args.redo)
    for line in summary["failed"]:
        print(f"failed: {line}", file=sys.stderr)
    print(f"analyze: {summary['runs']} runs, {summary['skipped']} already analysed, {summary['done']} analysed "
          f"now ({settings.space} space, at A(S)), {len(summary['failed'])} failed; see RUN/analysis.json")
    if summary["failed"]:
        raise UserError(f"{len(summary['failed'])} run(s) could not be analysed (listed above)")


def cmd_select(args) -> None:
    from .experiments.run import prepare
    from .methods import METHODS, get_method
    from .methods.masks import MaskMethodConfig, SparseDeltaTuned
    from .methods.saving import save_tuned

    spec = spec_from_args(args)
    if not issubclass(get_method(spec.method), MaskMethodConfig):
        masks = [n for n, cls in METHODS.items() if issubclass(cls, MaskMethodConfig)]
        raise UserError(f"method {spec.method!r} has no mask to select; mask methods: {', '.join(masks)}")
    run = prepare(spec)
    config = run.method
    indices, budget = config.select(run.model.to(run.device), run.context)
    tuned = SparseDeltaTuned(run.model, config, indices, budget)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_tuned(tuned, args.output, weights=False, metadata={"base_model": spec.model})
    print(tuned.describe())
    print(f"mask saved to {args.output}; train on it with `sparse-ft train ... --mask {args.output}`")


def cmd_tasks(args) -> None:
    from .data import describe_data_source
    from .tasks import PAPER_TASKS, TASKS

    print(f"The paper's seven tasks ({', '.join(PAPER_TASKS)}) and, marked 'extra', GLUE tasks it does not use:")
    for task in TASKS.values():
        labels = "float" if task.labels is None else "/".join(map(str, task.labels))
        extra = "" if task.name in PAPER_TASKS else "  (extra)"
        print(f"{task.name:6s} {task.kind:16s} metric={task.metric:22s} fields={','.join(task.fields)} "
              f"labels={labels}{extra}")
        print(f"{'':6s} data: {describe_data_source(task, args.data_dir)}")


def cmd_fetch_data(args) -> None:
    from .data import fetch_data

    fetch_data(args.tasks, args.output, seed=args.seed, overwrite=args.overwrite, log=print)
    print(f"use it with --data-dir {args.output} or SPARSE_FT_DATA={args.output}")


def cmd_methods(args) -> None:
    import dataclasses

    from .methods import METHODS

    for name, cls in METHODS.items():
        config = cls()  # the effective defaults (__post_init__ resolves "auto" choices)
        options = ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(cls)
                            if f.name != "sparsity")
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        sparsity = f"p = {config.sparsity} (--sparsity)" if cls.uses_sparsity else "p fixed by the method"
        print(f"{name}: {doc}")
        print(f"    {sparsity}; options (-o KEY=VALUE): {options or 'none'}")


def _csv(kind):
    def parse(text: str):
        try:
            return [None if item == "default" else kind(item) for item in text.split(",") if item]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def cmd_sweep(args) -> None:
    from .experiments.sweep import SweepSpec, load_sweep_file, run_sweep

    if args.file:
        sweep = load_sweep_file(args.file)
    else:
        if not (args.tasks and args.methods):
            raise UserError("give --file SWEEP.toml, or --tasks and --methods")
        sweep = SweepSpec(tasks=args.tasks, methods=args.methods, sparsities=args.sparsities or [None],
                          seeds=args.seeds or [0])
    flags = {"model": args.model, "data_dir": args.data_dir, "preset": args.preset, "train_limit": args.train_limit,
             "eval_limit": args.eval_limit, "device": args.device}
    sweep.run.update({k: v for k, v in flags.items() if v is not None})
    train_flags = {"max_steps": args.max_steps, "lr": args.lr, "batch_size": args.batch_size,
                   "eval_every": args.eval_every}
    sweep.train.update({k: v for k, v in train_flags.items() if v is not None})
    summary = run_sweep(sweep, args.output, jobs=args.jobs, jobs_per_gpu=args.jobs_per_gpu,
                        executor=args.executor, progress=not args.quiet, save_model=args.save_model)
    print(f"sweep {args.output}: {summary['runs']} runs, {summary['skipped']} already done, "
          f"{summary['done']} done now, {summary['failed']} failed")
    if summary["failed"]:
        raise UserError(f"{summary['failed']} run(s) failed; their error.json files say why; re-run to retry them")


def cmd_report(args) -> None:
    from .experiments.report import write_report

    for line in write_report(args.results, args.output, paper_csv=args.paper):
        print(line)


def _emit(payload: dict, text: str, json_path: str | None) -> None:
    print(text)
    if json_path:
        from .experiments.results import write_json_atomic

        write_json_atomic(Path(json_path), payload)


def _spectrum_text(m, where: str) -> str:
    flag = ("certified: each extreme converged and the starts agree" if m.converged and m.starts_agree else
            "NOT certified: an unconverged lambda_min is too high (raise --max-lanczos-steps)")
    return (f"Hessian of the {m.loss_scale} on {m.examples} training examples, restricted to the {m.dim:,} "
            f"coordinates {m.method} tunes, at {where}:\n"
            f"  lambda_max = {m.lambda_max:.6g}  (Ritz residual {m.residual_max:.2e})\n"
            f"  lambda_min = {m.lambda_min:.6g}  (Ritz residual {m.residual_min:.2e})\n"
            f"  rho_hat = {m.rho:.4g} (largest per-example gradient norm on those examples)\n"
            f"  {m.hvps} Hessian-vector products from 2 random starts; {flag}")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_spectrum(args) -> None:
    from .experiments.measure import measure_selected, measure_tuned
    from .experiments.saved import prepare_saved_run

    if args.run:
        run, tuned, _ = prepare_saved_run(args.run, device=args.device)
        m = measure_tuned(run, tuned, args.examples, args.lanczos_steps, args.max_lanczos_steps, "A(S)", _log)
        where = f"A(S) of the saved run {args.run}"
    else:
        if not (args.task and args.method):
            raise UserError("give --task and --method (the selected set at theta0), or --run DIR (a saved A(S))")
        m = measure_selected(spec_from_args(args), args.examples, args.lanczos_steps, args.max_lanczos_steps, _log)
        where = "theta0 (the selected set before training; Theorems 1-2 speak of A(S): use --run)"
    _emit(m.to_dict(), _spectrum_text(m, where), args.json)


def cmd_bounds(args) -> None:
    from theory.bounds import generalization_bound_report, stability_bound_report

    try:  # the bounds check their inputs' ranges and say which one failed
        checks = {"residual_min": args.residual_min}
        reports = [stability_bound_report(args.rho, args.lambda_min, args.sparsity, args.n, **checks),
                   generalization_bound_report(args.risk, args.rho, args.lambda_min, args.sparsity, args.n,
                                               args.C, args.delta, **checks)]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    _emit({"bounds": [r.to_dict() for r in reports]}, "\n".join(map(str, reports)), args.json)


def cmd_stability(args) -> None:
    from theory.bounds import check_stability

    from .experiments.measure import loo_stability, measure_tuned
    from .experiments.run import prepare
    from .experiments.saved import read_result, run_spec

    spec = run_spec(read_result(args.run)) if args.run else spec_from_args(args)
    _log(f"stability of {spec.method} on {spec.task}: {args.retrains} + 2 trainings (A(S), its same-seed rerun "
         f"for the noise floor, {args.retrains} leave-one-out retrains), then the spectrum and rho_hat at A(S)")
    trained = []
    estimate, n = loo_stability(spec, retrains=args.retrains, seed=args.seed, replicas=args.replicas,
                                replica_batch=args.replica_batch, progress=not args.quiet, trained=trained)
    run = prepare(spec)
    m = measure_tuned(run, trained[0], min(n, args.examples), log=_log)
    check = check_stability(estimate.epsilon, m.rho, m.lambda_min, m.sparsity, n,
                            ci=(estimate.ci_low, estimate.ci_high), residual_min=m.residual_min,
                            lambda_max=m.lambda_max)
    text = (f"{spec.method} on {spec.task}: {n} training examples, {args.retrains} leave-one-out retrains "
            f"(same-seed noise floor {estimate.noise_floor:.3g}); rho_hat and lambda_min measured at A(S) (the model "
            f"trained on all n) on {m.examples} examples, its tunable subspace (lambda_min residual "
            f"{m.residual_min:.2g}, {'certified' if m.converged and m.starts_agree else 'NOT certified'})\n{check}")
    _emit({"stability": estimate.to_dict(), "check": check.to_dict(), "subspace": m.to_dict()}, text, args.json)


def cmd_reproduce(args) -> None:
    from .data import resolve_data_dir
    from .experiments.reproduce import reproduce

    paper = args.paper
    folder = resolve_data_dir(args.data_dir)
    if paper is None and folder is not None and (folder.parent / "paper_table1.csv").is_file():
        paper = str(folder.parent / "paper_table1.csv")
    reproduce(args.preset, args.output, data_dir=str(folder) if folder else None, paper_csv=paper, model=args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparse-ft", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="fine-tune one model on one task with one method")
    add_run_arguments(p)
    p.add_argument("--mask", help="train on a mask saved by `sparse-ft select`")
    p.add_argument("--output", required=True, help="folder for result.json and model.safetensors (A(S))")
    p.add_argument("--save-model", action=argparse.BooleanOptionalAction, default=True,
                   help="write model.safetensors, the tuned model at A(S) (default: yes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a saved run's tuned model at A(S) on val or test")
    p.add_argument("run", help="a run folder (result.json + model.safetensors)")
    p.add_argument("--split", default="test", choices=("val", "test"))
    p.add_argument("--data-dir", help="score on this data folder instead of the run's own")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--json", help="also write {split, metrics, score} to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write a saved run as a transformers folder or a peft adapter (LoRA)")
    p.add_argument("run", help="a run folder (result.json + model.safetensors)")
    p.add_argument("--format", default="transformers", choices=("transformers", "peft"),
                   help="transformers: AutoModelForSequenceClassification (BERT, RoBERTa); peft: a LoRA adapter")
    p.add_argument("--output", required=True, help="the folder to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("analyze", help="the Hessian, rho, risks and Theorems 1-2 of saved runs, at A(S)")
    p.add_argument("runs", nargs="+", help="run folders, or sweep roots (every run below them)")
    p.add_argument("--examples", type=int, help="training examples the Hessian averages over (default: all n)")
    p.add_argument("--lanczos-steps", type=int, default=30, help="Krylov steps per random start")
    p.add_argument("--starts", type=int, default=2, help="independent Lanczos starts (agreement is reported)")
    p.add_argument("--space", default="subspace", choices=("subspace", "full"),
                   help="subspace: the tunable coordinates; full: every backbone coordinate (Theorem 1's)")
    p.add_argument("--jobs", type=int, default=1, help="runs analysed at once")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--redo", action="store_true", help="analyse runs that already have analysis.json again")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("select", help="compute a mask method's mask without training and save it")
    add_run_arguments(p, training=False)
    p.add_argument("--output", required=True, help="the mask file (safetensors)")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("sweep", help="a grid of (task, method, sparsity, seed) runs, resumable")
    p.add_argument("--file", help="a TOML sweep file (keys: tasks, methods, sparsities, seeds, options, ...)")
    p.add_argument("--tasks", type=_csv(str))
    p.add_argument("--methods", type=_csv(str))
    p.add_argument("--sparsities", type=_csv(float), help="comma list; 'default' = the method's own")
    p.add_argument("--seeds", type=_csv(int))
    for flag in ("--model", "--data-dir", "--preset", "--device"):
        p.add_argument(flag)
    for flag in ("--train-limit", "--eval-limit", "--max-steps", "--batch-size", "--eval-every"):
        p.add_argument(flag, type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--jobs", type=int, default=1, help="runs at once on this machine")
    p.add_argument("--jobs-per-gpu", type=int, default=1, help="runs sharing one GPU")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--output", required=True, help="results folder (one sub-folder per run)")
    p.add_argument("--save-model", action=argparse.BooleanOptionalAction, default=True,
                   help="each run writes model.safetensors, its tuned model at A(S) (default: yes)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="Table 1 (Markdown, CSV) and Figure 2 from a results folder")
    p.add_argument("results", help="a folder of runs (as written by `sparse-ft sweep`)")
    p.add_argument("--output", required=True, help="folder for table1.md, table1.csv, figure2.png, ...")
    p.add_argument("--paper", help="the paper's Table 1 CSV, to print side by side")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("spectrum", help="lambda_max, lambda_min and rho_hat on a method's tunable subspace, "
                                        "at theta0 (--task/--method) or at a saved run's A(S) (--run)")
    add_run_arguments(p, training=False)
    for action in p._actions:  # the run flags are optional here: --run replaces them
        if action.dest in ("task", "method"):
            action.required = False
    p.add_argument("--run", help="a saved run folder: measure its tuned model at A(S)")
    p.add_argument("--examples", type=int, default=16, help="training examples the Hessian averages over")
    p.add_argument("--lanczos-steps", type=int, default=20, help="Krylov steps per start to begin with")
    p.add_argument("--max-lanczos-steps", type=int, default=120,
                   help="double the steps until both extremes are certified, up to this many")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_spectrum)

    p = sub.add_parser("stability", help="leave-one-out stability against the Theorem 1 bound, measured at A(S)")
    add_run_arguments(p)
    for action in p._actions:
        if action.dest in ("task", "method"):
            action.required = False
    p.add_argument("--run", help="a saved run: retrain its spec (the same data, seeds and protocol)")
    p.add_argument("--retrains", type=int, default=4, help="K: leave-one-out retrains")
    p.add_argument("--replicas", choices=("sequential", "batched"), default="sequential",
                   help="retrain one model at a time, or all K + 2 as one vmapped batch of replicas "
                        "(methods with a fixed tunable set; see benchmarks/bench_loo_replicas.py)")
    p.add_argument("--replica-batch", type=int, help="replicas per batch with --replicas batched (default all)")
    p.add_argument("--examples", type=int, default=16, help="examples for rho and lambda_min at A(S)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json")
    p.set_defaults(func=cmd_stability)

    p = sub.add_parser("bounds", help="evaluate Theorems 1 and 2 from measured numbers (mean-loss scale)",
                       description="Theorem 1: 2 rho^2 / ((lambda_min + 2(1-p)) n); Theorem 2: R_hat + sqrt((C^2 + "
                                   "24 C rho^2 / (lambda_min + 2(1-p))) / (2 n delta)). Measure rho and lambda_min at "
                                   "A(S) with `sparse-ft analyze RUN` (or `spectrum --run RUN`).")
    p.add_argument("--rho", type=float, required=True,
                   help="rho: Lipschitz constant of the per-example loss, e.g. the largest per-example gradient norm")
    p.add_argument("--lambda-min", type=float, required=True,
                   help="Lambda_min: the smallest Hessian eigenvalue of the mean training loss at A(S)")
    p.add_argument("--sparsity", type=float, required=True, help="p in (0, 1]: the fraction of parameters tuned")
    p.add_argument("--n", type=int, required=True, help="n: the number of training examples")
    p.add_argument("--risk", type=float, default=0.0, help="R_hat: the empirical risk, mean training loss (Theorem 2)")
    p.add_argument("--C", type=float, default=1.0, help="C: the loss is bounded in [0, C] (Theorem 2)")
    p.add_argument("--delta", type=float, default=0.05, help="delta: the bound holds with probability >= 1 - delta")
    p.add_argument("--residual-min", type=float, default=0.0,
                   help="Lambda_min's Ritz residual, for the strict-PSD tolerance")
    p.add_argument("--json", help="also write both reports to this JSON file")
    p.set_defaults(func=cmd_bounds)

    p = sub.add_parser("reproduce", help="the paper's experiments: reduced Table 1, Figures 1-3, an index page")
    p.add_argument("--preset", default="cpu", help="quick (CB, 21 min on a 2-core CPU), cpu (MiniLM, 2 tasks x 4 methods x 3 seeds), paper (GPU)")
    p.add_argument("--data-dir", help="DIR/<task>/{train,val,test}.jsonl; default $SPARSE_FT_DATA, else the hub")
    p.add_argument("--paper", help="the paper's Table 1 CSV for the side-by-side table "
                                   "(default: DATA_DIR/../paper_table1.csv when it exists)")
    p.add_argument("--model", help="replace the preset's model (a hub id or a local folder)")
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("tasks", help="list the tasks and where each one's data comes from")
    p.add_argument("--data-dir", help="DIR/<task>/{train,val,test}.jsonl; default $SPARSE_FT_DATA, else the hub")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("fetch-data", help="write the paper's tasks from the hub as DIR/<task>/{train,val,test}.jsonl")
    p.add_argument("tasks", nargs="*", help="task names or task files with a [hub] (default: every registry task)")
    p.add_argument("--output", required=True, help="the data folder to write (then --data-dir DIR)")
    p.add_argument("--seed", type=int, default=0, help="seeds the 90/10 split of train into train/val")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_fetch_data)
    sub.add_parser("methods", help="list the methods and their options").set_defaults(func=cmd_methods)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .experiments.run import quiet_libraries

    quiet_libraries()
    try:
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit-time flush
    except UserError as exc:
        print(f"sparse-ft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparse-ft: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader closed the pipe (`sparse-ft tasks | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
