"""The editing commands of `edit_serve`: `edit` (compute a patch locally, or on a running
server with `--server`), `eval` (the evaluation harness) and `stats` (precompute key
statistics). Apart from `edit --server` they run in this process on a locally loaded model;
heavy imports happen inside the commands so `--help` stays fast.

Bad input (unknown method, missing file, bad JSON, unknown setting) is refused with a one-line
error before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from edit_serve.client import DEFAULT_URL

log = logging.getLogger("edit_serve")

#: the model the editing commands load when --model is not given
DEFAULT_MODEL = "smollm2-135m"


class EditingCLIError(ValueError):
    """Bad command-line input, reported in one line."""


# --- shared argument handling ---------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="profile name or .toml path (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="model dtype (default: the profile's)")


class _MethodNames:
    """The registered editing methods, listed when a help text is shown (loading them imports
    torch and every method, which a command that only parses its flags should not pay for)."""

    def __str__(self) -> str:
        from editors import list_editors

        return ", ".join(list_editors())


def _method_args(p: argparse.ArgumentParser) -> None:
    method = p.add_argument("--method", required=True, help="editing method: %(methods)s")
    method.methods = _MethodNames()  # argparse fills %(...)s from the action's attributes
    p.add_argument("--config", metavar="JSON",
                   help='method settings as a JSON object (e.g. \'{"v_steps": 25}\') or a path to a .json file')
    p.add_argument("--layers", type=int, nargs="+", metavar="L", help="layers to edit (default: the profile's)")
    p.add_argument("--editor", metavar="CHECKPOINT",
                   help="mend, ke: the trained editor checkpoint (`edit_serve train`); default: the one cached for "
                        "the model")


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


_positive, _non_negative = _at_least(1), _at_least(0)


def parse_config(text: str | None, layers: list[int] | None, editor: str | None = None) -> dict:
    """The method overrides from --config (JSON text or a .json file) and --layers."""
    config: dict = {}
    if text:
        source = text
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise EditingCLIError(f"--config is neither a JSON object nor an existing file: {text!r}")
            source = path.read_text()
        try:
            config = json.loads(source)
        except json.JSONDecodeError as e:
            raise EditingCLIError(f"--config is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(config, dict):
            raise EditingCLIError("--config must be a JSON object of method settings")
    if layers:
        config["layers"] = list(layers)
    if editor:
        if not os.path.isfile(editor):
            raise EditingCLIError(f"--editor {editor!r}: no such checkpoint file")
        config["editor"] = os.path.abspath(editor)
    return config


def _load(args):
    from edit_serve.models import load_model
    from edit_serve.profiles import get_profile

    profile = get_profile(args.model)
    log.info("loading %s on %s", profile.name, args.device)
    return load_model(profile, dtype=args.dtype, device=args.device)


# --- eval ----------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> None:
    from edit_serve.evaluation import EvalSettings, evaluate, read_records, table, write_json
    from edit_serve.evaluation.harness import evaluation_job

    config = parse_config(args.config, args.layers, args.editor)
    if args.sequential:
        mode = "sequential"
    else:
        mode = "batch" if args.batch else "single"
    settings = EvalSettings(mode=mode, batch_size=args.batch or 1, fluency_tokens=args.fluency_tokens,
                            score_batch_size=args.score_batch, greedy=not args.no_greedy,
                            progress=not args.no_progress)
    records = read_records(args.data, args.n)
    evaluation_job(args.method, records, config)  # refused before the model loads
    if args.n and len(records) < args.n:
        log.warning("%s holds only %d records; evaluating those", args.data, len(records))
    lm = _load(args)
    result = evaluate(lm.model, lm.tokenizer, lm.profile, args.method, records, config, settings)
    result = {"data": str(args.data), **result}
    write_json(result, args.output)
    print(table(result))
    print(f"wrote {args.output}")


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="edit a model record by record and measure the edits (reliability, generality, ...)",
        description="Evaluate an editing method on a JSONL file of the shared schema (prompt, subject, target_new, "
                    "paraphrase_prompts, neighborhood_prompts, portability; MQuAKE rows with `edits`). Metrics are "
                    "token-level top-1 accuracies under teacher forcing (the survey's way); locality compares with "
                    "the unedited model's own predictions. Each is also scored on the free greedy answer "
                    "(<metric>_greedy: the greedy continuation starts with the target or an alias; for locality, "
                    "it is token for token the unedited model's). Fluency is the n-gram entropy of greedy "
                    "generations. Peak memory is torch.cuda.max_memory_allocated on a GPU, else the process's peak "
                    "resident memory (model included) while edits are computed.")
    _method_args(p)
    p.add_argument("--data", required=True, help="JSONL file of evaluation records")
    p.add_argument("--n", type=_positive, help="use the first N records (default: all)")
    p.add_argument("--batch", type=_positive, metavar="K", help="batch mode: K records per patch")
    p.add_argument("--sequential", action="store_true",
                   help="apply the patches one after another without reverting and score everything at the end "
                        "(with --batch K: K records per patch)")
    p.add_argument("--output", "-o", required=True, help="where to write the result JSON")
    p.add_argument("--fluency-tokens", type=_non_negative, default=100,
                   help="greedy tokens generated per edit prompt for fluency; 0 skips fluency (default: %(default)s)")
    p.add_argument("--score-batch", type=_positive, default=32,
                   help="sequences per scoring forward pass (default: %(default)s)")
    p.add_argument("--no-greedy", action="store_true",
                   help="skip the free-greedy scoring (teacher-forced metrics only; faster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _model_args(p)
    p.set_defaults(func=cmd_eval)


# --- edit ----------------------------------------------------------------------------------


def _edit_records(args) -> list:
    from edit_serve.evaluation import Probe, Record, read_records, rephrasing_probes
    from edit_serve.probes import default_pool
    from editors import EditRequest

    given = [args.prompt, args.subject, args.target]
    if args.data:
        if any(given) or args.paraphrase or args.neighborhood or args.rephrasing:
            raise EditingCLIError("give either --data or --prompt/--subject/--target, not both")
        return read_records(args.data, args.n)
    if not all(given):
        raise EditingCLIError("an edit needs --prompt, --subject and --target (or --data FILE)")
    request = EditRequest(prompt=args.prompt, subject=args.subject, target_new=args.target,
                          target_true=args.target_true, rephrasings=tuple(args.rephrasing or ()))
    neighborhood = args.neighborhood or default_pool([args.subject])  # not the edit's own subject
    paraphrases = tuple(Probe(p, (args.target,)) for p in args.paraphrase or []) or rephrasing_probes([request])
    return [Record(id="cli", requests=(request,), paraphrases=paraphrases,
                   neighborhood=tuple(Probe(p) for p in neighborhood))]


def cmd_edit(args: argparse.Namespace) -> None:
    from edit_serve.evaluation import edit_with_eval
    from edit_serve.evaluation.harness import evaluation_job
    from patches import save

    if args.server is None and args.dry_run:
        raise EditingCLIError("--dry-run needs --server: a dry run measures the patch on a running server")
    if args.server is None and args.guard is not None:
        raise EditingCLIError("--guard needs --server: the server measures the edit against its live patches")
    if args.server is None and not args.output:
        raise EditingCLIError("name the patch file to write (-o FILE), or compute the edit on a running server "
                              "(--server)")
    output = Path(args.output) if args.output else None
    if output is not None and output.is_dir():
        raise EditingCLIError(f"--output {output} is a folder; name a .safetensors file")
    config = parse_config(args.config, args.layers, args.editor)
    records = _edit_records(args)
    if args.server is not None:
        _edit_on_server(args, [r.to_dict() for record in records for r in record.requests], config, output)
        return
    job = evaluation_job(args.method, records, config)  # refused before the model loads
    lm = _load(args)
    patch = edit_with_eval(lm.model, lm.tokenizer, lm.profile, job, records,
                           with_eval=not args.no_eval, fluency_tokens=args.fluency_tokens)
    save(patch, output)
    print(f"wrote {output}: patch {patch.id} ({patch.method}, {len(patch.requests)} request(s), "
          f"{patch.nbytes()} bytes of tensors)")
    _print_eval(patch.eval)


def _print_eval(figures: dict | None) -> None:
    """A patch's own eval figures in one line, the survey's metrics first (a patch's metadata
    keeps its keys sorted); nothing when it was not measured."""
    from edit_serve.evaluation.measure import METRICS

    numbers = {k: v for k, v in (figures or {}).items() if isinstance(v, float)}
    order = sorted(numbers, key=lambda k: (METRICS.index(k) if k in METRICS else len(METRICS), k))
    if numbers:
        print("eval " + "  ".join(f"{k} {numbers[k]:.3f}" for k in order))


def _edit_on_server(args, requests: list[dict], config: dict, output: Path | None) -> None:
    """`edit --server`: POST /v1/edits computes the patch on the server's editor, on top of its
    active patches, and applies it; with --dry-run only reports what it would do, with -o only
    writes the file."""
    import time

    from edit_serve.cli import describe_dry_run, guarded
    from edit_serve.client import AdminClient
    from patches import save_bytes

    if args.guard is not None and output is not None:
        raise EditingCLIError("--guard decides whether the server applies the edit; with -o FILE nothing is applied")
    local_only = [flag for flag, given in (("--paraphrase", args.paraphrase), ("--neighborhood", args.neighborhood),
                                           ("--fluency-tokens", args.fluency_tokens), ("--dtype", args.dtype),
                                           ("--device", args.device != "cpu"),
                                           ("--model", args.model != DEFAULT_MODEL)) if given]
    if local_only:
        raise EditingCLIError(f"{', '.join(local_only)}: for an edit computed here; with --server the server "
                              "measures the patch on its own model and locality set")
    if output is not None and args.dry_run:
        raise EditingCLIError("give either -o FILE (write the patch, apply nothing) or --dry-run, not both")
    client = AdminClient(args.server, timeout=EDIT_TIMEOUT_S)
    body = {"method": args.method, "requests": requests, "config": config, "eval": not args.no_eval,
            "apply": output is None and not args.dry_run, **({} if args.guard is None else {"guard": args.guard})}
    if sys.stderr.isatty():  # a batch can take minutes; say what the wait is for
        print(f"computing the {args.method} edit on {client.server} (Ctrl-C stops it there) ...", file=sys.stderr)
    started = time.perf_counter()
    if output is not None:
        save_bytes(client.edit(body, download=True), output)
        print(f"wrote {output}: computed on {client.server} in {time.perf_counter() - started:.1f} s; not applied")
        return
    result = client.edit(body)
    if args.dry_run:
        print(describe_dry_run(result))
        print(f"computed in {result['seconds']:.1f} s")
        return
    print(f"applied {result['id']} ({result['patch']['method']}), computed in {result['seconds']:.1f} s on top of "
          f"patch set {result['computed_on']}; patch set {result['version']}" + guarded(result))
    _print_eval(result["patch"].get("eval"))


#: the longest an edit computed on a server may take (a MEMIT batch of thousands takes hours on a CPU)
EDIT_TIMEOUT_S = 24 * 3600.0


def add_edit(sub) -> None:
    p = sub.add_parser(
        "edit", help="compute an edit patch (locally, or on a running server with --server)",
        description="Compute a patch with an editing method on a locally loaded model and write it as a "
                    ".safetensors patch file. The patch records its requests, its config and the eval figures "
                    "measured on its own requests (reliability; generality on the --paraphrase prompts, or "
                    "without them on the --rephrasing ones, which the edit was fitted to; locality on "
                    "--neighborhood prompts, or a built-in set of generic facts that do not name the subject, against "
                    "the unedited model). With --server, the server computes it on top of its active patches "
                    "(POST /v1/edits) and applies it; --dry-run reports what it would do instead, -o writes the "
                    "file without applying it.")
    _method_args(p)
    p.add_argument("--prompt", help="the prompt, with the subject in it or '{}' where it goes")
    p.add_argument("--subject", help="the subject whose fact changes")
    p.add_argument("--target", help="the new target")
    p.add_argument("--target-true", help="the current target (recorded in the request)")
    p.add_argument("--rephrasing", action="append", metavar="PROMPT",
                   help="another wording of the prompt that the edit is fitted to as well "
                        "(repeatable; not mend, ke)")
    p.add_argument("--paraphrase", action="append", metavar="PROMPT",
                   help="a paraphrase of the prompt that the eval figures measure (repeatable)")
    p.add_argument("--neighborhood", action="append", metavar="PROMPT",
                   help="an unrelated prompt that must keep its answer (repeatable)")
    p.add_argument("--data", help="instead of one request: the records of a JSONL file (shared schema), one patch")
    p.add_argument("--n", type=_positive, help="with --data: the first N records")
    p.add_argument("-o", "--output", help="patch file to write (.safetensors); required without --server")
    p.add_argument("--server", nargs="?", const=os.environ.get("EDIT_SERVE_URL") or DEFAULT_URL, metavar="URL",
                   help="compute the edit on this running server and apply it (URL default: $EDIT_SERVE_URL or "
                        f"{DEFAULT_URL}; the admin token is read from $EDIT_SERVE_ADMIN_TOKEN)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --server: report what the edit would do (its own prompts, the probe answers it "
                        "changes); nothing is applied")
    p.add_argument("--guard", type=float, metavar="TOLERANCE",
                   help="with --server: apply only if neither the retention of the edits already live nor locality "
                        "on the server's probe prompts would fall by more than this (e.g. 0.02)")
    p.add_argument("--no-eval", action="store_true", help="do not measure the patch (faster)")
    p.add_argument("--fluency-tokens", type=_non_negative, default=0,
                   help="also measure fluency with this many greedy tokens (default: %(default)s, off)")
    _model_args(p)
    p.set_defaults(func=cmd_edit)


# --- stats ---------------------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> None:
    try:
        from editors.stats import precompute_stats
    except ImportError:
        raise EditingCLIError("this installation's editors package has no key statistics (editors.stats)") from None
    if args.corpus != "model" and not args.corpus.startswith("datasets:") and not os.path.isfile(args.corpus):
        raise EditingCLIError(f"--corpus {args.corpus!r} is not 'model', 'datasets:NAME' or an existing text file")
    lm = _load(args)
    bad = [x for x in args.layers if not 0 <= x < lm.profile.num_layers]
    if bad:
        raise EditingCLIError(f"layers {bad} are not in 0..{lm.profile.num_layers - 1} for {lm.profile.name}")
    files = precompute_stats(lm.model, lm.tokenizer, lm.profile, args.layers, corpus=args.corpus,
                             n=args.samples, length=args.length)
    for layer, path in sorted(files.items()):
        print(f"layer {layer}: {path}")


def add_stats(sub) -> None:
    p = sub.add_parser(
        "stats", help="precompute the key statistics ROME and MEMIT need",
        description="Compute C = E[k k^T] of the inputs of the MLP output projection of each layer over a "
                    "corpus and cache it on disk (keyed by model fingerprint, layer, corpus and sample count), "
                    "so edits do not pay for it.")
    p.add_argument("--layers", type=int, nargs="+", required=True, metavar="L", help="layers to compute")
    p.add_argument("--corpus", default="model",
                   help="'model' (text the model samples itself), a text file, or datasets:NAME[:CONFIG[:SPLIT]] "
                        "(default: %(default)s)")
    p.add_argument("--samples", type=_positive, help="number of corpus windows (default: the editors' default)")
    p.add_argument("--length", type=_positive, help="tokens per window (default: the editors' default)")
    _model_args(p)
    p.set_defaults(func=cmd_stats)


# --- train ---------------------------------------------------------------------------------


def _exclusions(specs: list[str] | None) -> list:
    """The records named by --exclude FILE[:N] (the first N records of FILE, or all)."""
    from edit_serve.evaluation import read_records

    held = []
    for spec in specs or []:
        path, _, n = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
        if not os.path.isfile(path):
            raise EditingCLIError(f"--exclude {spec!r}: no file {path!r}")
        held.extend(read_records(path, int(n) if n else None))
    return held


def cmd_train(args: argparse.Namespace) -> None:
    from edit_serve.evaluation import read_records, training_examples
    from editors.context import EditContext
    from editors.trained import net_class
    from editors.training import train_editor

    net_class(args.method)  # a trained editor, or a one-line refusal
    settings = parse_config(args.config, None)
    for name in ("steps", "max_minutes", "val_size", "save_every", "val_every"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    output = Path(args.output)
    if output.is_dir():
        raise EditingCLIError(f"--output {output} is a folder; name a .safetensors file")
    if output.exists() and not args.resume and not args.overwrite:
        raise EditingCLIError(f"{output} exists; pass --resume to continue its training or --overwrite to start afresh")
    for path in args.data:
        if not os.path.isfile(path):
            raise EditingCLIError(f"--data {path!r} is not a file")
    held = _exclusions(args.exclude)
    examples = [e for path in args.data for e in training_examples(read_records(path), held)]
    if not examples:
        raise EditingCLIError("no training records left (every record is excluded or has several requests)")
    log.info("%d training examples from %s (%d evaluation records excluded)", len(examples), ", ".join(args.data),
             len(held))
    lm = _load(args)
    ctx = EditContext.from_loaded(lm)
    path, state = train_editor(ctx, args.method, examples, output, layers=args.layers, settings=settings,
                               resume=args.resume, progress=not args.no_progress, cache=not args.no_cache)
    last = state.val_curve[-1] if state.val_curve else {}
    print(f"wrote {path}: {args.method} editor for {lm.profile.name} (fingerprint {ctx.fingerprint}), "
          f"{state.step} steps in {state.seconds / 60:.1f} min"
          + (f"; validation edit success {last['edit_success']:.3f}, locality {last['locality']:.3f}" if last else ""))


def add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a MEND or KE editor network for a model",
        description="Train the editor network of a trained editing method (mend, ke) on edit records (JSONL of the "
                    "shared schema: prompt, subject, target_new, paraphrase_prompts, neighborhood_prompts). The "
                    "checkpoint (safetensors; its metadata names the method, the base model's fingerprint, the layers "
                    "and the settings) is written every --save-every steps with a resume state beside it, and cached "
                    "for the model so `edit_serve edit --method mend` finds it. Validation edit success and locality "
                    "are logged every --val-every steps on a held-out slice of the records.")
    p.add_argument("--method", required=True, help="mend or ke")
    p.add_argument("--data", required=True, action="append", metavar="FILE", help="training records (repeatable)")
    p.add_argument("--exclude", action="append", metavar="FILE[:N]",
                   help="leave out records sharing an id or subject with the first N records of FILE (e.g. the "
                        "evaluation set; repeatable)")
    p.add_argument("--layers", type=int, nargs="+", metavar="L",
                   help="layers to edit (default: the profile's, else the last 3)")
    p.add_argument("--config", metavar="JSON",
                   help="network and training settings as JSON (e.g. '{\"lr\": 1e-4, \"rank\": 1920}')")
    p.add_argument("--steps", type=_positive, help="training steps (default: 2000)")
    p.add_argument("--max-minutes", type=float, help="stop and save after this much wall time")
    p.add_argument("--val-size", type=_non_negative, help="held-out validation records (default: 20)")
    p.add_argument("--val-every", type=_positive, help="steps between validations (default: 100)")
    p.add_argument("--save-every", type=_positive, help="steps between checkpoints (default: 100)")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is --output")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --output exists")
    p.add_argument("--no-cache", action="store_true", help="do not install the checkpoint in the model's editor cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _model_args(p)
    p.set_defaults(func=cmd_train)


def add_editing_commands(sub) -> None:
    add_edit(sub)
    add_eval(sub)
    add_stats(sub)
    add_train(sub)
