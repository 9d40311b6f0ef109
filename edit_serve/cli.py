"""The `edit_serve` command: serve, and manage the patches of a running server.

Every command has --help and exits non-zero with a one-line reason on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from edit_serve.cli_editing import add_editing_commands
from edit_serve.client import DEFAULT_URL, AdminClient, ClientError
from edit_serve.config import DEFAULT_COMPACT_TOLERANCE, DEFAULT_PROBE_EDITS, LOG_FORMAT

log = logging.getLogger("edit_serve")


class CLIError(RuntimeError):
    """A failure to report in one line."""


def _guard_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guard", type=float, metavar="TOLERANCE",
                   help="apply only if, measured first as a dry run, neither the retention of the edits already "
                        "live nor locality on the server's probe prompts would fall by more than this (e.g. 0.02); "
                        "else nothing changes and the command fails with the reason")


def _server_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=os.environ.get("EDIT_SERVE_URL", DEFAULT_URL),
                   help="server URL (default: $EDIT_SERVE_URL or %(default)s); the admin token is "
                        "read from $EDIT_SERVE_ADMIN_TOKEN")


def _describe_request(r: dict) -> str:
    if not isinstance(r, dict):
        return str(r)
    prompt = r.get("prompt", "")
    subject = r.get("subject")
    if subject and "{}" in prompt:
        prompt = prompt.format(subject)
    return f"{prompt} -> {r.get('target_new', r.get('target', '?'))}"


def _request_words(r) -> str:
    """What `edit_serve find` searches in an edit request: its prompt, subject, targets and
    rephrasings."""
    if not isinstance(r, dict):
        return str(r)
    rephrasings = r.get("rephrasings") if isinstance(r.get("rephrasings"), list) else []
    return "\n".join([_describe_request(r), str(r.get("target_true", "")), *map(str, rephrasings)])


# --- serve -------------------------------------------------------------------------------


#: flags that only mean something on Ray Serve (argparse default None: "not given")
RAY_ONLY = {"replicas": "--replicas", "ray_address": "--ray-address", "gpus_per_replica": "--gpus-per-replica",
            "editor_gpus": "--editor-gpus"}


def _local_path(value: str | None, files_only: bool = False) -> str | None:
    """An absolute path when `value` names an existing file (or folder) (replicas and the
    editor run elsewhere, with another working directory); other values (a profile name, a hub
    id) unchanged."""
    exists = os.path.isfile if files_only else os.path.exists
    return os.path.abspath(value) if value and exists(value) else value


def _or(value, default):
    return default if value is None else value


def _validated(build):
    """Run a config constructor; pydantic's errors become one line naming the field."""
    from pydantic import ValidationError

    try:
        return build()
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or e.title
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise CLIError(f"{where}: {first['msg']}{more}") from None


def serve_config(args: argparse.Namespace):
    """The ServerConfig the `serve` flags describe (validated; paths absolute)."""
    from edit_serve.config import EngineConfig, ProbeConfig, ServerConfig

    adapters = {}
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CLIError(f"--adapter takes NAME=PATCH_FILE, not {spec!r}")
        adapters[name] = os.path.abspath(path)
    editors = {}
    for spec in args.editor_checkpoint or []:
        method, sep, path = spec.partition("=")
        if not sep or not method or not path:
            raise CLIError(f"--editor-checkpoint takes METHOD=CHECKPOINT, not {spec!r}")
        editors[method] = os.path.abspath(path)
    engine = _validated(lambda: EngineConfig(
        engine=args.engine, model=_local_path(args.model, files_only=True), weights=_local_path(args.weights),
        dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
        vllm_memory_utilization=args.vllm_memory_utilization, adapters=adapters,
        enable_adapters=args.enable_adapters, editors=editors))
    probe_set = os.path.abspath(args.probe_set) if args.probe_set else None
    probes = _validated(lambda: ProbeConfig(enabled=not args.no_probes, interval_s=args.probe_interval,
                                            probe_set=probe_set, edits_per_run=args.probe_edits))
    settings = {"engine": engine, "host": args.host, "port": args.port, "log_level": args.log_level, "probes": probes,
                "warm_editor": args.warm_editor}
    if args.patch_store:
        settings["patch_store"] = args.patch_store
    return _validated(lambda: ServerConfig(**settings))


def ray_app_args(args: argparse.Namespace, config):
    """The Ray Serve application's arguments for these `serve --ray` flags: the whole engine
    and probe configuration travels to every replica and the editor."""
    from edit_serve.ray_serve import RayAppArgs

    if config.probes.enabled and config.probes.probe_set:
        from edit_serve.probes import read_probe_file

        read_probe_file(config.probes.probe_set)  # a bad file fails here, in one line, not in a replica
    return _validated(lambda: RayAppArgs(
        engine=config.engine, replicas=_or(args.replicas, 1), patch_store=str(config.patch_store),
        probes=config.probes.enabled, probe_interval_s=config.probes.interval_s,
        probe_edits=config.probes.edits_per_run,
        probe_set=str(config.probes.probe_set) if config.probes.probe_set else None,
        num_gpus_per_replica=_or(args.gpus_per_replica, 0), editor_num_gpus=_or(args.editor_gpus, 0),
        log_level=config.log_level, warm_editor=config.warm_editor))


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from edit_serve.api.app import create_app

    if not args.ray:
        given = [flag for dest, flag in RAY_ONLY.items() if getattr(args, dest) is not None]
        if given:
            raise CLIError(f"{', '.join(given)} only apply with --ray")
    config = serve_config(args)
    if config.admin_token is None:
        log.warning("EDIT_SERVE_ADMIN_TOKEN is not set: the admin API will refuse every call")
    if args.ray:
        from edit_serve.ray_serve import run

        run(ray_app_args(args, config), config.host, config.port, args.ray_address)
        return
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level,
                timeout_graceful_shutdown=10)


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text}")
    return value


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible and admin APIs",
                       description="Serve a model over the OpenAI-compatible API with hot-loadable patches.")
    p.add_argument("--model", default="smollm2-135m", help="profile name or .toml path (default: %(default)s)")
    p.add_argument("--weights", help="load weights from this folder or hub id instead of the profile's source")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="model runtime (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="serving dtype (default: the profile's)")
    p.add_argument("--device", default="cpu", help="torch device for the hf engine (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--patch-store", help="folder for patch files and the patch log "
                                         "(default: $EDIT_SERVE_PATCH_STORE or $EDIT_SERVE_CACHE/patch-store)")
    p.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together (default: %(default)s)")
    p.add_argument("--editor-checkpoint", action="append", metavar="METHOD=CHECKPOINT",
                   help="the trained editor POST /v1/edits uses for METHOD (mend, ke; repeatable); default: the one "
                        "`edit_serve train` cached for the model")
    p.add_argument("--max-model-len", type=int, help="longest prompt + completion in tokens (default: the model's, "
                                                     "capped at 4096)")
    vllm = p.add_argument_group("vLLM engine")
    vllm.add_argument("--vllm-memory-utilization", type=float, default=0.2, metavar="SHARE",
                      help="GPU memory share for weights + KV cache; on vLLM's CPU backend the host memory share "
                           "for the KV cache (default: %(default)s)")
    vllm.add_argument("--adapter", action="append", metavar="NAME=PATCH",
                      help="serve a low-rank patch as a LoRA adapter that requests choose with model=NAME "
                           "(repeatable)")
    vllm.add_argument("--enable-adapters", action="store_true", help="enable LoRA adapters without loading any")
    p.add_argument("--probe-interval", type=_seconds, default=30.0, metavar="SECONDS",
                   help="seconds between locality/retention probe runs; 0 probes only after apply and revert "
                        "(default: %(default)s)")
    p.add_argument("--probe-set", metavar="FILE",
                   help='JSONL file of locality probe prompts ({"prompt": ...} per line); default: built at '
                        "start-up from generic factual prompts the model answers confidently")
    p.add_argument("--probe-edits", type=int, default=DEFAULT_PROBE_EDITS, metavar="N",
                   help="most active edit requests one probe run measures; with more, runs take turns through "
                        "them (default: %(default)s)")
    p.add_argument("--no-probes", action="store_true", help="do not run locality/retention probes")
    ray = p.add_argument_group("Ray Serve (a cluster of replicas)")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve: replicas + an editor actor")
    ray.add_argument("--replicas", type=int, help="model replicas with --ray (default: 1)")
    ray.add_argument("--ray-address", help="join this Ray cluster (e.g. auto or ray://host:10001); default: "
                                           "start a local one")
    ray.add_argument("--gpus-per-replica", type=float, help="GPUs each replica reserves (default: 0)")
    ray.add_argument("--editor-gpus", type=float, help="GPUs the editor actor reserves (default: 0)")
    p.add_argument("--warm-editor", action="store_true",
                   help="start the editor with the server and compute the key statistics of a first rome, memit or "
                        "alphaedit edit in its background, so that edit need not wait for them")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


# --- patch management ----------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace) -> None:
    for path in args.patch:  # every file is checked before the first is sent
        if not os.path.isfile(path):
            raise CLIError(f"no such file: {path}")
    client = AdminClient(args.server)
    if args.dry_run:
        if len(args.patch) > 1:
            raise CLIError("--dry-run measures one patch on the server's patch set as it is; give one file")
        result = client.dry_run(args.patch[0], args.guard)
        print(json.dumps(result, indent=2) if args.json else describe_dry_run(result))
        return

    def apply(path: str) -> str:
        result = client.apply(path, args.guard)
        return f"applied {result['id']} ({result['patch']['method']}); patch set {result['version']}" + guarded(result)

    _one_by_one(args.patch, apply, "file(s)", "applied")


def _one_by_one(items: list[str], change, noun: str, state: str) -> None:
    """`change` each item in the order given, each its own change, printing what it returns; a
    failure stops there, and its message says how many went before (they keep their change)."""
    for done, item in enumerate(items):
        try:
            print(change(item))
        except ClientError as e:
            if not done:
                raise
            raise ClientError(f"{item}: {e}; the {done} {noun} before it stay {state}") from None


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def guarded(result: dict) -> str:
    """What a guarded apply measured, as a clause of the CLI's line (nothing when unguarded)."""
    g = result.get("guard")
    if not g:
        return ""
    return (f" (guard: retention of {g['edits']} live edit(s) {_ratio(g['retention_before'])} -> "
            f"{_ratio(g['retention_after'])}, locality {_ratio(g['locality_before'])} -> "
            f"{_ratio(g['locality_after'])})")


def describe_dry_run(result: dict) -> str:
    """A dry-run report as the CLI prints it."""
    r = result["dry_run"]
    lines = [f"dry run of {result['id']} ({result['method']}) on patch set {result['version']}: nothing applied"]
    held = sum(e["after"] for e in r["edits"])
    lines.append(f"edits        {held}/{len(r['edits'])} would hold (before: {sum(e['before'] for e in r['edits'])})")
    for e in r["edits"]:
        mark = "yes" if e["after"] else "NO "
        lines.append(f"  {mark}  {e['prompt']} -> {e['target_new']}  (answers {e['answer']!r})")
    lines.append(f"locality     {_ratio(r['locality_ratio'])}: {r['probe_prompts'] - len(r['changed'])} of "
                 f"{r['probe_prompts']} probe prompts keep their answer"
                 + (f"; the locality gauge would read {_ratio(r['probe_locality_ratio'])}"
                    if r.get("probe_locality_ratio") is not None else ""))
    for c in r["changed"]:
        lines.append(f"  changed  {c['prompt']}: {c['before']!r} -> {c['after']!r}")
    if r.get("retained_edits"):
        lines.append(f"live edits   {_ratio(r['retention'])} of {r['retained_edits']} would still hold "
                     f"(now {_ratio(r['retention_before'])})")
        for e in r["lost"]:
            lines.append(f"  lost     {e['prompt']} -> {e['target_new']}")
    if r.get("about_edits"):
        lines.append(f"not counted  {len(r['about_edits'])} probe prompt(s) naming an edited subject")
        for c in r["about_edits"]:
            lines.append(f"  about    {c['prompt']}: {c['before']!r} -> {c['after']!r}")
    if "refused" in result:
        lines.append(f"guard {result['guard']}: " + (result["refused"] or "a guarded apply would apply it"))
    return "\n".join(lines)


def cmd_revert(args: argparse.Namespace) -> None:
    client = AdminClient(args.server)

    def revert(patch_id: str) -> str:
        result = client.revert(patch_id)
        return f"reverted {result['id']}; patch set {result['version']}"

    _one_by_one(args.id, revert, "patch(es)", "reverted")


def cmd_drop(args: argparse.Namespace) -> None:
    result = AdminClient(args.server).drop(args.id, args.request)
    print(f"{args.id} -> {result['id']}: {len(set(args.request))} edit(s) dropped, {result['requests']} left "
          f"({result['rows']} rows); patch set {result['version']}")


def cmd_find(args: argparse.Namespace) -> None:
    result = AdminClient(args.server).patches()
    needle = args.text.casefold()
    found = [{"patch": p["id"], "kind": p["kind"], "method": p["method"], "request": i, "edit": r}
             for p in result["patches"] for i, r in enumerate(p["requests"])
             if needle in _request_words(r).casefold()]
    if not found:
        raise CLIError(f"no active edit mentions {args.text!r} ({len(result['patches'])} active patches searched)")
    if args.json:
        print(json.dumps(found, indent=2))
        return
    for f in found:
        print(f"{f['patch']}  {f['method']:<10} request {f['request']:<4} {_describe_request(f['edit'])}")
    kinds = {f["kind"] for f in found}
    hints = []
    if "memory" in kinds:
        hints.append("drop an edit of a memory patch with `edit_serve drop ID N`")
    if kinds - {"memory"}:
        hints.append("a weight or side-module patch reverts as a whole, all its edits, with `edit_serve revert ID`")
    print("; ".join(hints))


def cmd_edits(args: argparse.Namespace) -> None:
    client = AdminClient(args.server)
    if args.cancel is not None:
        e = client.cancel_edit(args.cancel)["cancelled"]
        outcome = ("it was stopped as it was computed; nothing of it was applied" if e["cancelled_while"] == "computing"
                   else "nothing of it was computed")
        print(f"cancelled edit #{e['number']} ({e['method']}, {_requests(e)}, {', '.join(e['subjects'])}); {outcome}")
        return
    result = client.pending_edits()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(describe_pending(result, time.time()))


def _requests(edit: dict) -> str:
    """'1 request' or 'N requests' for a pending edit of GET /v1/edits."""
    return f"{edit['requests']} request{'s' if edit['requests'] != 1 else ''}"


def describe_pending(result: dict, now: float) -> str:
    """GET /v1/edits as the CLI prints it: a line per pending edit, the one computing first."""
    edits = result["pending"]
    lines = [f"{len(edits) or 'no'} edit{'s' if len(edits) != 1 else ''} pending; patch set {result['version']}"]
    for e in edits:
        since = e.get("started_at", e["received_at"])  # computing (or applying) since, else waiting since
        subjects = ", ".join(e["subjects"]) + (", ..." if e["requests"] > len(e["subjects"]) else "")
        lines.append(f"#{e['number']:<4} {e['method']:<10} {_requests(e):<14} {e['state']} for {now - since:.0f} s  "
                     f"{subjects}{'' if e['apply'] else '  (not to be applied)'}")
    return "\n".join(lines)


def cmd_patches(args: argparse.Namespace) -> None:
    client = AdminClient(args.server)
    result = client.patches(None if args.save or args.json else LISTED_REQUESTS)
    if args.save:
        save_patches(client, result, Path(args.save))
    elif args.json:
        print(json.dumps(result, indent=2))
    else:
        print(describe_patches(result))


def save_patches(client: AdminClient, result: dict, folder: Path) -> None:
    """Download the active patches, exactly as uploaded, as `NNN-<id>.safetensors` in `folder`:
    the names sort in apply order, so `edit_serve apply FOLDER/*.safetensors` rebuilds the same
    patch set (the same version) on another server. A folder with patch files in it is refused."""
    from patches import save_bytes

    if folder.exists() and (not folder.is_dir() or any(folder.glob("*.safetensors"))):
        raise CLIError(f"{folder} is not an empty folder for patch files; name a new one")
    folder.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(result["patches"]))))
    for n, p in enumerate(result["patches"], 1):
        save_bytes(client.download(p["id"]), folder / f"{n:0{width}d}-{p['id']}.safetensors")
    n = len(result["patches"])
    print(f"saved {n} patch{'es' if n != 1 else ''} of patch set {result['version']} to {folder}; "
          f"`edit_serve apply {folder}/*.safetensors` applies them in the same order")


def _more(shown: int, total: int, ratio: float | None) -> list[str]:
    """The line saying how many more a probe report counts than it lists."""
    left = (round(total * (1 - ratio)) if ratio is not None else 0) - shown
    return [f"  ... and {left} more"] if left > 0 else []


#: requests `edit_serve patches` shows per patch (it asks the server for no more)
LISTED_REQUESTS = 3


def describe_patches(result: dict) -> str:
    """GET /v1/patches as the CLI prints it: the patch set, the last probe run, and a line per
    active patch (id, method, when applied, the share of its edits still held, its requests)."""
    lines = [f"patch set {result['version']}: {len(result['patches'])} active"]
    probes = result.get("probes")
    if probes:
        about = f" ({probes['about_edits']} naming an edited subject not counted)" if probes.get("about_edits") else ""
        stale = "" if probes["version"] == result["version"] else f"; last run on {probes['version']}, a new one is due"
        replica = f" (the lowest of the replicas: {probes['replica']})" if probes.get("replica") else ""
        active, measured = probes.get("edits_active", probes["edits"]), probes.get("edits_measured", probes["edits"])
        turns = (f" (each one's latest result; {measured} measured in this run"
                 + (f", {active - probes['edits']} not yet" if active > probes["edits"] else "") + ")"
                 if measured < active else "")
        lines.append(f"probes       locality {_ratio(probes['locality_ratio'])} on {probes['prompts']} prompts{about}, "
                     f"retention {_ratio(probes['edit_retention_ratio'])} over {probes['edits']} edits{turns}"
                     f"{replica}{stale}")
        moved, not_held = probes.get("moved", []), probes.get("not_held", [])
        lines += [f"  moved    {m['prompt']}: {m['before']!r} -> {m['now']!r}" for m in moved]
        lines += _more(len(moved), probes["prompts"], probes["locality_ratio"])
        lines += [f"  not held {m['prompt']} -> {m['target']!r}: answers {m['now']!r} ({m['patch']})" for m in not_held]
        lines += _more(len(not_held), probes["edits"], probes["edit_retention_ratio"])
    for p in result["patches"]:
        when = datetime.fromtimestamp(p["applied_at"]).isoformat(timespec="seconds") if p["applied_at"] else "-"
        held = "-" if p.get("retention") is None else f"{p['retention']:.2f}"
        requests = "; ".join(_describe_request(r) for r in p["requests"][:LISTED_REQUESTS])
        left = p.get("n_requests", len(p["requests"])) - LISTED_REQUESTS
        more = f" (+{left} more)" if left > 0 else ""
        lines.append(f"{p['id']}  {p['method']:<10} {when}  held {held:<4}  {requests}{more}")
    return "\n".join(lines)


def cmd_compact(args: argparse.Namespace) -> None:
    result = AdminClient(args.server).compact(args.tolerance, args.dry_run, "memory" if args.memory else "delta")
    r = result["report"]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    if result["applied"]:
        print(f"compacted {len(result['replaced'])} patches into {result['id']}; patch set {result['version']}")
    else:  # the patch a dry run builds is not kept: the real compaction makes its own (another id)
        print(f"would compact {len(result['replaced'])} patches into one; patch set {result['version']}")
    print(f"retention    {r['retention_before']:.3f} -> {r['retention_after']:.3f} over {r['edits']} edits")
    print(f"locality     {r['locality_before']:.3f} -> {r['locality_after']:.3f} on {r['probe_prompts']} probe "
          f"prompts (against the {r['locality_against']})")
    if result.get("refused"):
        print(result["refused"].replace("compaction refused", "it would be refused"))


def cmd_inspect(args: argparse.Namespace) -> None:
    from patches import PatchError, load

    try:
        summary = load(args.patch).summary()
    except PatchError as e:
        raise CLIError(f"{args.patch}: {e}") from None
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"id           {summary['id']}")
    for key in ("kind", "method", "base_model", "architecture", "created_at"):
        print(f"{key:<12} {summary[key]}")
    print(f"fingerprint  {summary['base_fingerprint']}")
    print(f"size         {summary['tensor_bytes']} bytes of tensors")
    for i, r in enumerate(summary["requests"]):  # numbered as `edit_serve drop` counts them
        print(f"request {i:<4} {_describe_request(r)}")
    for t in summary.get("targets", []):
        rank = f" rank {t['rank']}" if t["rank"] else ""
        print(f"target       {t['param']} ({t['form']}{rank})")
    for s in summary.get("side_modules", []):
        print(f"side module  {s['name']}: {s['type']} at {s['attach']}")
    if summary["eval"]:
        print(f"eval         {json.dumps(summary['eval'])}")


def add_patch_commands(sub) -> None:
    p = sub.add_parser("apply", help="upload patch files to a server and apply them")
    p.add_argument("patch", nargs="+", help="a .safetensors patch file; several are applied in the order given, "
                                            "each as its own change (a failure stops there)")
    p.add_argument("--dry-run", action="store_true",
                   help="apply nothing: report what the patch would do (its edits' success, locality on the "
                        "server's probe prompts, the answers that would change), measured beside the served model")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the server's JSON")
    _guard_arg(p)
    _server_arg(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("revert", help="revert active patches on a server")
    p.add_argument("id", nargs="+", help="a patch id (see `edit_serve patches`); several are reverted in the order "
                                         "given, each as its own change (a failure stops there)")
    _server_arg(p)
    p.set_defaults(func=cmd_revert)

    p = sub.add_parser("drop", help="drop single edits from an active memory patch (SERAC's, a merged one "
                                    "included), as one change")
    p.add_argument("id", help="the memory patch (see `edit_serve patches`)")
    p.add_argument("request", nargs="+", type=int, help="an edit to drop: its index in the patch's requests, from 0 "
                                                         "(`edit_serve find TEXT` or `edit_serve inspect` shows them)")
    _server_arg(p)
    p.set_defaults(func=cmd_drop)

    p = sub.add_parser("find", help="find the active edits whose prompt, subject, target or rephrasings mention a "
                                    "text (case-insensitive), with their patch and index for `drop` or `revert`")
    p.add_argument("text")
    p.add_argument("--json", action="store_true", help="print JSON")
    _server_arg(p)
    p.set_defaults(func=cmd_find)

    p = sub.add_parser("patches", help="list a server's active patches (or save them)")
    _server_arg(p)
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.add_argument("--save", metavar="FOLDER", help="download the active patches into a new folder, named in apply "
                                                    "order (`edit_serve apply FOLDER/*.safetensors` replays them)")
    p.set_defaults(func=cmd_patches)

    p = sub.add_parser("edits", help="list the edits a server is computing or has waiting (POST /v1/edits and "
                                     "`edit --server` compute them one at a time)")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.add_argument("--cancel", type=int, metavar="N", help="cancel edit #N: one waiting is never computed, the one "
                                                           "being computed is stopped; neither is applied")
    _server_arg(p)
    p.set_defaults(func=cmd_edits)

    p = sub.add_parser("compact", help="replace a server's active weight patches (or memory patches) by one that "
                                       "makes the same change")
    p.add_argument("--memory", action="store_true", help="merge the active memory patches (SERAC's edits) into one "
                                                          "instead of the weight patches")
    p.add_argument("--tolerance", type=float, default=DEFAULT_COMPACT_TOLERANCE,
                   help="refuse if edit retention or probe-set locality would fall by more than this "
                        "(default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="report what compaction would do; change nothing")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    _server_arg(p)
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("inspect", help="show what a patch file holds (validates it)")
    p.add_argument("patch", help="a .safetensors patch file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)


COMMANDS = [add_serve, add_patch_commands, add_editing_commands]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edit_serve", description="A patchable LLM inference server.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = getattr(args, "log_level", None) or os.environ.get("EDIT_SERVE_LOG_LEVEL", "warning")
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except (CLIError, ClientError) as e:
        print(f"edit_serve {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`edit_serve patches | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail too
        return 141
    except Exception as e:  # noqa: BLE001 - one line for anything unexpected, details in debug
        log.debug("failure", exc_info=True)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"edit_serve {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
