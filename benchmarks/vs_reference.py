"""Ours against the official EMSEdit code (github xpq-tech/emsedit), side by side on one machine.

Both implementations run one after the other, each (implementation, method) in its own process, on
the same SmolLM2-135M safetensors folder (``smedit_plugin.models.ensure_converted``), the same
dtype, the same first ``--n-train`` ZsRE training records, the same evaluation facts, batch size,
micro-batch size, edit modules, rank and number of training steps. One JSON row per run:
``{impl, method, protocol, train_s_per_edit, edit_s_per_edit, efficacy, generalization, specificity,
peak_rss_mb}`` (plus the settings), and a table on screen.

    python benchmarks/vs_reference.py --reference-src /work/ref/emsedit \\
        --reference-python /work/venvref/bin/python --out vs_reference.json

Methods: SMEdit / EMSEdit and MALMEN2 / MALMEN^2 under ``--protocol batch`` (``num_seq = 1``,
``max_steps = n_train / n_edits`` batches); SMEdit / EMSEdit and RLEdit2 / RLEdit^2 under
``--protocol sequential`` (one trajectory of ``num_seq`` batches, one Adam step, as the reference).

The reference checkout is never modified. Its worker (``--worker reference``, run by
``--reference-python``, a venv with torch, transformers, hydra-core, omegaconf) adapts it at run
time, from the outside:

* hydra overrides: ``model=llama-3-instruct`` re-pointed at the local folder (``model.name_or_path``,
  ``model.half`` from ``--dtype``, ``model.edit_modules``), ``model_device=cpu editor_device=cpu``,
  ``editor.rank``, ``editor.iters`` (2 BP steps for MALMEN^2 / RLEdit^2), ``editor.max_steps``,
  ``editor.lr`` / ``meta_lr`` / ``reg_coef`` / ``loc_coef`` from our TRAINING YAML (so both sides train the
  same objective from the same start; ``--reference-own-settings`` keeps the reference config's values),
  ``num_seq``, ``dataset.n_edits``, ``dataset.batch_size``, the data paths, ``hydra.run.dir`` (a temp
  folder, so its on-disk caches of keys / value gradients do not collide);
* stub modules in ``sys.modules``: ``swanlab`` (its logger; ES/GS/LS are read from the
  ``swanlab.log`` calls) and ``glue_eval.glue_eval`` (imports ``datasets``; unused with ``glue_step=-1``);
  ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` return 0 (CPU build);
* timers wrapped around its editor methods (``train`` / ``train_batch`` / ``train_seq`` = training;
  ``cache`` + ``predict_param_shifts`` + ``edit_model`` outside training = editing); ``torch.manual_seed``
  before the run (it sets no seed; the DataLoaders shuffle);
* data: the records our loader reads, written in the reference's ZsRE fields (``src``, ``rephrase``,
  ``ans`` = our ``alt`` target, ``loc`` = our locality question without its final ``?``, which the
  reference appends, ``loc_ans``), so both sides see the same prompts. Only ``n_train`` training and
  ``n_edits * num_seq`` evaluation records are written, so its shuffling only permutes them.

The model folder of each side is converted from the same GGUF by our converter under that side's
transformers (``$SMEDIT_CACHE``, default ``~/.cache/smedit``; the reference venv runs it with this
checkout on ``PYTHONPATH``): a folder written by transformers 5 does not load faithfully with 4.x.

Variants of our side for ablations: ``--ours "MALMEN2[rank=1024,reference_adam_duplicates=true,layers=reference]"``;
``layers=reference`` edits the official run's modules, other fields override the TRAINING YAML
(``reference_adam_duplicates=true`` applies each Adam update once per BP step, as the reference's
optimiser does with a shared network; ``cumulative_steps=false`` reverts each BP step in training).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "zsre"
ROW_KEYS = ("impl", "method", "protocol", "train_s_per_edit", "edit_s_per_edit", "efficacy", "generalization",
            "specificity", "peak_rss_mb")
#: our method -> (reference editor, BP steps), per protocol
PAIRS = {"batch": {"SMEdit": ("emsedit", 2), "MALMEN2": ("malmen", 2)},
         "sequential": {"SMEdit": ("emsedit", 2), "RLEdit2": ("rledit", 2)}}
REFERENCE_NAMES = {"emsedit": "EMSEdit", "malmen": "MALMEN^2", "rledit": "RLEdit^2"}
#: the edit modules of the official run quoted in issue 13 (gate_proj 12-16, up_proj 19-24)
REFERENCE_LAYERS = ([f"model.layers.{i}.mlp.gate_proj" for i in range(12, 17)]
                    + [f"model.layers.{i}.mlp.up_proj" for i in range(19, 25)])


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux: KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# our side
# ---------------------------------------------------------------------------------------------
def parse_variant(entry: str) -> tuple[str, dict[str, Any]]:
    """``"MALMEN2[rank=1024,cumulative_steps=false]"`` -> ``("MALMEN2", {"rank": 1024, "cumulative_steps": False})``."""
    match = re.fullmatch(r"\s*([A-Za-z0-9_-]+)\s*(?:\[(.*)\])?\s*", entry)
    if match is None:
        raise SystemExit(f"--ours entry {entry!r} is not METHOD or METHOD[field=value,...]")
    overrides: dict[str, Any] = {}
    for item in filter(None, (match.group(2) or "").split(",")):
        field, _, value = item.partition("=")
        try:
            overrides[field.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field.strip()] = value.strip()
    return match.group(1), overrides


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Train our hypernetwork on the training records, edit the evaluation facts, score them."""
    import torch

    from smedit_plugin.hparams import load_method_hparams
    from smedit_plugin.records import load_records
    from smedit_plugin.hypernet.archive import load_archive
    from smedit_plugin.hypernet.training import edit_and_score, train_hypernet
    from smedit_plugin.models import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    method, overrides = parse_variant(args.method)
    layers = overrides.pop("layers", None)
    modules = REFERENCE_LAYERS if layers == "reference" else args.edit_modules
    settings = dict(n_edits=args.n_edits, num_seq=args.num_seq, val_n_edits=args.n_edits, max_steps=-1, n_epochs=1,
                    val_fraction=0.0, rank=args.rank, edit_modules=list(modules), micro_batch_size=args.micro_batch_size,
                    model_dtype=args.dtype, bp_steps=2)
    hp = load_method_hparams(method, args.model, training=True).replace(**{**settings, **overrides})
    model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype)
    train = load_records(args.train_data, "zsre")[: args.n_train]
    evaluation = load_records(args.eval_data, "zsre")[: args.n_edits * args.num_seq]
    with tempfile.TemporaryDirectory() as tmp:
        result = train_hypernet(model, tok, hp, train, Path(tmp) / "archive", progress=True)
        editor, _ = load_archive(Path(tmp) / "archive", model, hp)
        metrics = edit_and_score(model, tok, editor, evaluation, n_edits=args.n_edits, progress=True)
    lrs = torch.cat([net.lr.weight.detach().flatten() for nets in editor.nets for net in nets.values()])
    return {"impl": "ours", "method": args.method, "rank": hp.rank, "edit_modules": list(hp.edit_modules),
            "learned_edit_lr": float(lrs.mean()), "train_s_per_edit": result.seconds_per_edit,
            "edit_s_per_edit": metrics["edit_seconds"] / len(evaluation),
            **{k: metrics[k] for k in ("efficacy", "generalization", "specificity")},
            "optimizer_steps": result.state.optimizer_steps, "peak_rss_mb": peak_rss_mb()}


def reference_settings(method: str, model: str) -> dict[str, float]:
    """Our TRAINING YAML's edit step size, meta learning rate and loss weights, in the reference config's names.

    In batch mode both sides penalise ``reg_coef * ||shift||^2`` (SMEdit / EMSEdit); MALMEN's and RLEdit's KL
    weight is ``loc_coef`` on both sides. So the same fields give the same training objective."""
    from smedit_plugin.hparams import load_method_hparams

    hp = load_method_hparams(method, model, training=True)
    names = {"lr": hp.lr, "meta_lr": hp.meta_lr}
    if method == "SMEdit":
        names["reg_coef"] = hp.shift_penalty_coef()
    if hp.locality_coef() > 0:
        names["loc_coef"] = hp.locality_coef()
    return names


def write_reference_data(args: argparse.Namespace, folder: Path) -> tuple[Path, Path]:
    """Our loader's records in the reference's ZsRE fields (same prompts on both sides)."""
    from smedit_plugin.records import load_records

    def rows(records: list) -> list[dict[str, str]]:
        out = []
        for r in records:
            loc = r.locality_prompts[0]
            out.append({"src": r.prompt, "rephrase": r.rephrase_prompts[0], "ans": r.target_new,
                        "loc": loc[:-1] if loc.endswith("?") else loc, "loc_ans": r.locality_answers[0]})
        return out

    train = load_records(args.train_data, "zsre")[: args.n_train]
    evaluation = load_records(args.eval_data, "zsre")[: args.n_edits * args.num_seq]
    paths = folder / "zsre_train.json", folder / "zsre_eval.json"
    for path, records in zip(paths, (train, evaluation)):
        path.write_text(json.dumps(rows(records)))
    return paths


# ---------------------------------------------------------------------------------------------
# the reference side (runs under --reference-python; must not import smedit_plugin)
# ---------------------------------------------------------------------------------------------
def _install_stubs(logged: list[dict[str, Any]]) -> None:
    """Stand-ins for the reference's logger and GLUE evaluator, and CUDA memory counters on CPU."""
    import torch

    swanlab = types.ModuleType("swanlab")
    swanlab.init = lambda *a, **k: None
    swanlab.log = lambda data, *a, **k: logged.append({k2: float(v) for k2, v in data.items()})
    sys.modules["swanlab"] = swanlab
    glue = types.ModuleType("glue_eval.glue_eval")
    glue.GLUEEval = None
    sys.modules["glue_eval.glue_eval"] = glue
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_reserved = lambda *a, **k: 0


def _wrap_timers(editor_classes: list[type], clock: dict[str, float]) -> None:
    """Accumulate the seconds of training methods and of edit-time caching / solving / applying."""
    state = {"training": False}

    def timed_train(fn):
        def wrapper(self, *a, **k):
            state["training"] = True
            start = time.perf_counter()
            try:
                return fn(self, *a, **k)
            finally:
                clock["train"] += time.perf_counter() - start
                state["training"] = False
        return wrapper

    def timed_edit(fn):
        def wrapper(self, *a, **k):
            if state["training"]:
                return fn(self, *a, **k)
            start = time.perf_counter()
            try:
                return fn(self, *a, **k)
            finally:
                clock["edit"] += time.perf_counter() - start
        return wrapper

    seen: set = set()
    for cls in editor_classes:
        for klass in cls.__mro__:
            for name in ("train", "train_batch", "train_seq"):
                if name in vars(klass) and (klass, name) not in seen:
                    seen.add((klass, name))
                    setattr(klass, name, timed_train(vars(klass)[name]))
            for name in ("cache", "predict_param_shifts", "edit_model"):
                if name in vars(klass) and (klass, name) not in seen:
                    seen.add((klass, name))
                    setattr(klass, name, timed_edit(vars(klass)[name]))


def run_reference(args: argparse.Namespace) -> dict[str, Any]:
    """Run the official ``main.py`` through hydra with the settings of this comparison."""
    import importlib
    import runpy

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    src = Path(args.reference_src).resolve()
    sys.path.insert(0, str(src))
    logged: list[dict[str, Any]] = []
    _install_stubs(logged)
    editor_name, iters = args.reference_editor, 2
    module = importlib.import_module(f"editor.{editor_name}")
    clock = {"train": 0.0, "edit": 0.0}
    _wrap_timers([getattr(module, editor_name.upper())], clock)
    sequential = args.num_seq > 1
    max_steps = args.n_train // args.n_edits
    overrides = [
        "dataset=zsre", "model=llama-3-instruct", f"editor={editor_name}",
        f"model.name_or_path={args.model_path}", f"model.name={args.model}",
        f"model.half={'true' if args.dtype == 'bfloat16' else 'false'}",
        "model.edit_modules=[" + ",".join(args.edit_modules) + "]",
        "model_device=cpu", "editor_device=cpu", f"num_seq={args.num_seq}",
        f"dataset.n_edits={args.n_edits}", f"dataset.batch_size={args.micro_batch_size}",
        f"dataset.train_path={args.ref_train}", f"dataset.valid_path={args.ref_eval}",
        f"editor.rank={args.rank}", f"editor.iters={iters}", "editor.n_epochs=1",
        *(f"editor.{name}={value}" for name, value in json.loads(args.ref_settings or "{}").items()),
        f"hydra.run.dir={args.workdir}", "hydra.job.chdir=true", "hydra.output_subdir=null",
        "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
    ]
    if not sequential:
        overrides.append(f"editor.max_steps={max_steps}")
    sys.argv = [str(src / "main.py"), *overrides]
    runpy.run_path(str(src / "main.py"), run_name="__main__")
    final = [entry for entry in logged if "ES" in entry][-1]
    edits_trained = args.num_seq * args.n_edits if sequential else max_steps * args.n_edits
    return {"impl": "reference", "method": REFERENCE_NAMES[editor_name],
            "train_s_per_edit": clock["train"] / edits_trained,
            "edit_s_per_edit": clock["edit"] / (args.n_edits * args.num_seq),
            "efficacy": final["ES"], "generalization": final["GS"], "specificity": final["LS"],
            "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _spawn(python: str, worker_args: list[str]) -> dict[str, Any]:
    """Run one worker process (its progress bars pass through) and read the JSON row it writes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        env = {**os.environ, "OMP_NUM_THREADS": worker_args[worker_args.index("--threads") + 1],
               "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([python, str(Path(__file__).resolve()), *worker_args, "--row-out", str(out)], env=env)
        if proc.returncode != 0 or not out.is_file():
            return {"error": f"worker exited with {proc.returncode}"}
        return json.loads(out.read_text())


def reference_model_path(python: str, model: str) -> str:
    """The packaged model converted under the reference venv's transformers, by our converter run there.

    A folder written under another major transformers release does not load faithfully (transformers 5
    writes ``TokenizersBackend`` and ``rope_parameters``, which 4.x does not read), so each side loads the
    conversion its own release made from the same GGUF weights."""
    code = "import sys; from smedit_plugin.gguf_convert import ensure_converted; print(ensure_converted(sys.argv[1]))"
    done = subprocess.run([python, "-c", code, model], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"converting {model} under {python} failed (it needs our package's dependencies there):\n"
                         + done.stderr[-2000:])
    return done.stdout.strip().splitlines()[-1]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table: metrics in percent, seconds per edit, peak RSS."""
    head = ["impl", "method", "protocol", "ES %", "GS %", "LS %", "train s/edit", "edit s/edit", "peak RSS MB"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    num = lambda v, f: "-" if v is None else format(v, f)
    lines = [[r.get("impl", "?"), r.get("method", "?"), r.get("protocol", "?"), pct(r.get("efficacy")),
              pct(r.get("generalization")), pct(r.get("specificity")), num(r.get("train_s_per_edit"), ".3f"),
              num(r.get("edit_s_per_edit"), ".3f"), num(r.get("peak_rss_mb"), ".0f")] for r in rows]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-src", type=Path, help="checkout of github xpq-tech/emsedit (never modified)")
    p.add_argument("--reference-python", default="/work/venvref/bin/python",
                   help="python of a venv with torch, transformers, hydra-core, omegaconf for the reference")
    p.add_argument("--protocol", choices=tuple(PAIRS), default="batch")
    p.add_argument("--methods", nargs="+", default=None, help="our methods (default: the protocol's pairs)")
    p.add_argument("--ours", nargs="*", default=[], metavar="METHOD[field=value,...]",
                   help="extra variants of our side only (ablations)")
    p.add_argument("--skip-reference", action="store_true", help="run our side only")
    p.add_argument("--skip-ours", action="store_true", help="run the reference side (and --ours variants) only")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--train-data", type=Path, default=DATA / "zsre_train.json")
    p.add_argument("--eval-data", type=Path, default=DATA / "zsre_eval.json")
    p.add_argument("--n-train", type=int, default=256, help="training records (batch: n_train / n_edits steps)")
    p.add_argument("--n-edits", type=int, default=64)
    p.add_argument("--num-seq", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=None, help="hypernetwork rank (default: our YAML's)")
    p.add_argument("--edit-modules", nargs="+", default=None, help="default: our YAML's")
    p.add_argument("--reference-layers", action="store_true",
                   help="edit the official run's modules (gate_proj 12-16, up_proj 19-24) on both sides")
    p.add_argument("--reference-own-settings", action="store_true",
                   help="keep the reference config's lr, meta_lr, reg_coef, loc_coef instead of our YAML's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("vs_reference.json"))
    # worker-only
    p.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--reference-editor", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--ref-train", help=argparse.SUPPRESS)
    p.add_argument("--ref-eval", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--ref-settings", help=argparse.SUPPRESS)
    p.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        if args.worker == "ours":
            sys.path.insert(0, str(ROOT))
        row = run_ours(args) if args.worker == "ours" else run_reference(args)
        args.row_out.write_text(json.dumps(row))
        return 0

    sys.path.insert(0, str(ROOT))
    from tqdm.auto import tqdm

    from smedit_plugin.hparams import load_method_hparams
    from smedit_plugin.fileio import write_json_atomic
    from smedit_plugin.models import ensure_converted

    if not args.skip_reference and (args.reference_src is None or not (args.reference_src / "main.py").is_file()):
        raise SystemExit("--reference-src must be a checkout of xpq-tech/emsedit (with main.py)")
    if args.protocol == "batch" and args.num_seq != 1:
        raise SystemExit("--protocol batch uses --num-seq 1")
    if args.protocol == "sequential" and args.num_seq < 2:
        raise SystemExit("--protocol sequential needs --num-seq >= 2")
    if args.protocol == "sequential":
        args.n_train = args.n_edits * args.num_seq  # the reference trains on one trajectory per epoch
    shipped = load_method_hparams("SMEdit", args.model, training=True)
    rank = args.rank or shipped.rank
    modules = REFERENCE_LAYERS if args.reference_layers else (args.edit_modules or list(shipped.edit_modules))
    ensure_converted(args.model)  # our side's folder (this venv's transformers)
    model_path = reference_model_path(args.reference_python, args.model) if not args.skip_reference else ""
    common = ["--model", args.model, "--dtype", args.dtype, "--train-data", str(args.train_data),
              "--eval-data", str(args.eval_data), "--n-train", str(args.n_train), "--n-edits", str(args.n_edits),
              "--num-seq", str(args.num_seq), "--micro-batch-size", str(args.micro_batch_size), "--rank", str(rank),
              "--threads", str(args.threads), "--seed", str(args.seed), "--edit-modules", *modules]
    methods = args.methods or list(PAIRS[args.protocol])
    jobs: list[tuple[str, str]] = []
    for method in methods:
        if not args.skip_ours:
            jobs.append(("ours", method))
        if not args.skip_reference:
            jobs.append(("reference", method))
    jobs += [("ours", variant) for variant in args.ours]
    settings = {"model": args.model, "dtype": args.dtype, "n_train": args.n_train, "n_edits": args.n_edits,
                "num_seq": args.num_seq, "micro_batch_size": args.micro_batch_size, "rank": rank,
                "edit_modules": modules, "threads": args.threads}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vs_reference_") as tmp:
        ref_train, ref_eval = write_reference_data(args, Path(tmp))
        for impl, method in tqdm(jobs, desc="runs", unit="run"):
            tqdm.write(f"== {impl} {method} ({args.protocol})")
            if impl == "ours":
                row = _spawn(sys.executable, ["--worker", "ours", "--method", method, *common])
            else:
                editor = PAIRS[args.protocol][method][0]
                workdir = Path(tmp) / f"ref-{editor}"
                matched = {} if args.reference_own_settings else reference_settings(method, args.model)
                row = _spawn(args.reference_python, ["--ref-settings", json.dumps(matched),
                    "--worker", "reference", "--reference-src", str(args.reference_src.resolve()),
                    "--reference-editor", editor, "--model-path", model_path, "--ref-train", str(ref_train),
                    "--ref-eval", str(ref_eval), "--workdir", str(workdir), *common])
            row.setdefault("impl", impl)
            row.setdefault("method", method)
            rows.append({**{k: row.get(k) for k in ROW_KEYS}, "protocol": args.protocol, **settings, **row})
            write_json_atomic(args.out, rows)
            tqdm.write(format_table(rows[-1:]))
    print(format_table(rows))
    print(f"rows written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
