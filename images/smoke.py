"""`make image-smoke`: run each built image's real entrypoint inside it with buildah (docs/images.md).

    .venv/bin/python images/smoke.py [ROLE=REFERENCE ...]     # default: the three images of bincounter/images.py

- trainer: `bincounter synth` and `bincounter split` write tiny synthetic shards, then the manifests'
  command (`torchrun -m bincounter.train`) trains 1 epoch on 2 processes and writes a model folder;
- server: the image's ENTRYPOINT and CMD verbatim (`bincounter serve --model /mnt/models ... --port 8080`)
  serve that model folder as UID 10001 on a read-only root filesystem (a read-only bind mount of the
  container's root; /tmp is a tmpfs as in the manifests); one V1 and one V2 request must return the
  count that the library computes in this process from the same folder;
- pipeline: the ENTRYPOINT with its CMD, `bincounter k8s check --help`, and each KFP component's
  container command exactly as pipeline.yaml has it (cleanup runs to the end on the local engine; the others
  up to the call of their function, whose inputs need a cluster and S3), plus every import of each
  component's source, function bodies included.

Needs root and buildah, and the images built by `make images BUILDER=buildah`. Everything runs in a
private network namespace with only a loopback interface, so no server is reachable from outside
and nothing reaches the network. Not part of `make test`: building the images downloads gigabytes.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bincounter import images  # noqa: E402  (stdlib only; the rest is imported where it is used)

STORAGE_DRIVER = os.environ.get("BUILDAH_STORAGE_DRIVER", "overlay")  # as images/buildah.sh
NETNS_FLAG = "BINCOUNTER_SMOKE_IN_NETNS"
SERVER_PORT = 8080  # the image's CMD; free in the private network namespace
RESULTS: list[tuple[str, str, str]] = []  # (role, check, outcome)


class SmokeFailure(RuntimeError):
    pass


def buildah(*args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(["buildah", "--storage-driver", STORAGE_DRIVER, *args], capture_output=True,
                            text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise SmokeFailure(f"buildah {' '.join(args[:3])} ... exited {result.returncode}:\n"
                           f"{(result.stdout + result.stderr)[-3000:]}")
    return result


def image_config(ref: str) -> dict:
    info = json.loads(buildah("inspect", "--type", "image", ref).stdout)
    return info["OCIv1"]["config"]


@contextlib.contextmanager
def container(ref: str):
    name = buildah("from", "--pull=never", ref).stdout.strip().splitlines()[-1]
    try:
        yield name
    finally:
        buildah("rm", name, check=False)


def run_argv(ctr: str, argv: list[str], mounts: list[str] = (), env: dict[str, str] | None = None) -> list[str]:
    """The `buildah run` command line: the image's USER and WORKDIR apply (none is overridden)."""
    # --network host: this private namespace. --hostname localhost: buildah's /etc/hosts (the host's) does
    # not name the container's random hostname and there is no DNS here, but torchrun's rendezvous looks
    # its own hostname up (in a pod, the kubelet writes it into /etc/hosts).
    opts = ["run", "--isolation", "chroot", "--network", "host", "--hostname", "localhost"]
    for m in mounts:
        opts += ["--mount", m]
    for k, v in (env or {}).items():
        opts += ["--env", f"{k}={v}"]
    return ["buildah", "--storage-driver", STORAGE_DRIVER, *opts, ctr, "--", *argv]


def run_in(ctr: str, argv: list[str], mounts: list[str] = (), env: dict | None = None,
           timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(run_argv(ctr, argv, mounts, env), capture_output=True, text=True, timeout=timeout)


def record(role: str, check: str, result: subprocess.CompletedProcess | None = None, ok: bool | None = None,
           detail: str = "") -> None:
    passed = (result.returncode == 0) if ok is None else ok
    RESULTS.append((role, check, ("ok" if passed else "FAILED") + (f": {detail}" if detail else "")))
    print(f"[{role}] {check}: {'ok' if passed else 'FAILED'}{' - ' + detail if detail else ''}", flush=True)
    if not passed:
        out = (result.stdout + result.stderr)[-4000:] if result is not None else ""
        raise SmokeFailure(f"{role}: {check} failed{': ' + detail if detail else ''}\n{out}")


# ---------------------------------------------------------------- trainer

def smoke_trainer(ref: str, work: Path) -> Path:
    """Synthetic shards, then a 2-process torchrun of 1 epoch; returns the model folder it wrote."""
    data = work / "trainer"
    data.mkdir()
    os.chown(data, 10001, 10001)  # the image runs as UID 10001, which must write here
    cfg = image_config(ref)
    entry = cfg["Entrypoint"]
    mounts = [f"type=bind,src={data},dst=/data,rw"]  # bind mounts are read-only unless rw
    with container(ref) as ctr:
        r = run_in(ctr, ["id", "-u"])
        record("trainer", "runs as UID 10001", r, ok=r.stdout.strip() == "10001", detail=f"id -u = {r.stdout.strip()}")
        r = run_in(ctr, entry + ["synth", "--output", "/data/abid", "--images", "48", "--concurrency", "1"], mounts)
        record("trainer", "ENTRYPOINT synth: 48 synthetic bins", r)
        r = run_in(ctr, entry + ["split", "/data/abid", "--output", "/data/shards", "--val", "0.25", "--test", "0.25",
                                 "--short-side", "64", "--shard-size", "8", "--processes", "1"], mounts)
        record("trainer", "ENTRYPOINT split: shards", r)
        # The manifests' command and arguments (bincounter/k8s/objects.py); torchrun takes the process
        # count and the rendezvous from PET_* variables, as PyTorchJob and TrainJob set them.
        from bincounter.k8s import objects
        argv = objects.train_command() + objects.train_args("/data/shards", "/data/model", TRAIN_ARGS)
        start = time.monotonic()
        r = run_in(ctr, argv, mounts, env={"PET_NPROC_PER_NODE": "2", "PET_STANDALONE": "1"}, timeout=1800)
        model = data / "model"
        files = sorted(p.name for p in model.iterdir()) if model.is_dir() else []
        ok = r.returncode == 0 and {"model.pt", "config.json"} <= set(files)
        ranks = sum(f"rank={i}/2 " in r.stdout + r.stderr for i in (0, 1))
        record("trainer", f"{' '.join(argv[:3])} on 2 processes (PET_NPROC_PER_NODE=2), 1 epoch", r,
               ok=ok and ranks == 2,
               detail=f"{time.monotonic() - start:.0f} s, model folder: {', '.join(files)}")
    return model


# The trainer's run: tiny and offline. `--pretrained ""` because the smoke test's network namespace
# has no route out, and ImageNet weights (the recipe's default) would be downloaded.
TRAIN_ARGS = ["--arch", "resnet18", "--pretrained", "", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4",
              "--input-size", "64", "--loader-workers", "0", "--device", "cpu", "--print-freq", "1"]


# ---------------------------------------------------------------- server

def listening_pid(port: int) -> int | None:
    """The process listening on TCP `port` in this network namespace (from /proc), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A = LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                    return int(proc.name)
    return None


def proc_status(pid: int, field: str) -> str:
    """A field of /proc/PID/status: its first value (e.g. Uid -> the real UID)."""
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith(field + ":"))
    return line.split()[1]


def listening_uid(port: int) -> int | None:
    pid = listening_pid(port)
    return None if pid is None else int(proc_status(pid, "Uid"))


@contextlib.contextmanager
def read_only_root(ctr: str, mountpoints: list[str]):
    """Emulate Kubernetes' readOnlyRootFilesystem: the container's root becomes a read-only bind mount
    (buildah run has no flag for it); mounts given to `buildah run` (/tmp, the model) stay as given.

    The mountpoints (the volumes', and /run/.containerenv that buildah binds in) are made first, as the
    kubelet does. buildah 1.28 then crashes in its cleanup after each run (it cannot remove
    /run/.containerenv from a read-only root, and its error path dereferences a nil logger), so the exit
    status of these runs is buildah's, not the command's: the checks below look at what the command did."""
    root = Path(buildah("mount", ctr).stdout.strip())
    for path in mountpoints:
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (root / "run" / ".containerenv").touch()
    subprocess.run(["mount", "--bind", root, root], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", root], check=True)
        yield root
    finally:
        subprocess.run(["umount", root], check=False)
        buildah("umount", ctr, check=False)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SmokeFailure(f"the server exited with {proc.returncode} before it was ready")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        time.sleep(1)
    raise SmokeFailure(f"the server was not ready at {url} within {timeout:.0f} s")


def smoke_server(ref: str, model_dir: Path, work: Path) -> None:
    from bincounter.model import load_model_dir
    from bincounter.serving import client
    from bincounter.serving.inference import Counter

    cfg = image_config(ref)
    argv = cfg["Entrypoint"] + cfg["Cmd"]  # verbatim: ... bincounter serve --model /mnt/models ... --port 8080
    photo = sorted((work / "trainer" / "abid").rglob("*.jpg"))[0]
    jpeg = photo.read_bytes()
    expected = Counter(*load_model_dir(model_dir)).predict([jpeg])[0]  # the library, in this process
    log = (work / "server.log").open("w")
    with container(ref) as ctr, read_only_root(ctr, ["/mnt/models"]):
        r = run_in(ctr, ["sh", "-c", "touch /home/bincounter/probe"])
        refused = [ln.strip() for ln in r.stderr.splitlines() if "Read-only file system" in ln]
        record("server", "root filesystem is read-only", ok=bool(refused),
               detail=refused[0] if refused else "touch /home/bincounter/probe succeeded")
        mounts = [f"type=bind,src={model_dir},dst=/mnt/models,ro", "type=tmpfs,dst=/tmp"]
        server = subprocess.Popen(run_argv(ctr, argv, mounts), stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{SERVER_PORT}"
            start = time.monotonic()
            wait_ready(f"{url}/v2/models/bincounter/ready", server)
            record("server", f"{' '.join(argv)}: ready", ok=True, detail=f"{time.monotonic() - start:.0f} s")
            uid = listening_uid(SERVER_PORT)
            record("server", "the serving process runs as UID 10001", ok=uid == 10001, detail=f"UID {uid}")
            for protocol in ("v1", "v2"):
                got = client.predict([jpeg], url=url, names=[photo.name], protocol=protocol)[0]
                same = got.count == expected.count and abs(got.confidence - expected.confidence) < 1e-4
                record("server", f"{protocol.upper()} request on 127.0.0.1:{SERVER_PORT}", ok=same,
                       detail=f"count {got.count} (library: {expected.count}, confidence {got.confidence:.3f})")
            # Stop it as the kubelet does: SIGTERM to the container's PID 1 (tini, the server's parent),
            # which forwards it; the server must shut down by itself.
            pid = listening_pid(SERVER_PORT)
            tini = int(proc_status(pid, "PPid"))
            name = Path(f"/proc/{tini}/comm").read_text().strip()
            os.kill(tini, signal.SIGTERM)
            start = time.monotonic()
            try:
                server.wait(timeout=60)
                stopped = listening_pid(SERVER_PORT) is None
            except subprocess.TimeoutExpired:
                stopped = False
            record("server", f"SIGTERM to PID 1 ({name}) stops the server", ok=stopped and name == "tini",
                   detail=f"{time.monotonic() - start:.1f} s")
        finally:
            if server.poll() is None:  # it did not stop: kill the server and tini too, not only buildah
                pid = listening_pid(SERVER_PORT)
                for victim in ([pid, int(proc_status(pid, "PPid"))] if pid else []):
                    with contextlib.suppress(OSError):
                        os.kill(victim, signal.SIGKILL)
                server.kill()
                server.wait()
            log.close()
    # The server's log, without buildah's crash after a read-only-root run (see read_only_root).
    print((work / "server.log").read_text().split("panic: ")[0][-1500:], flush=True)


# ---------------------------------------------------------------- pipeline

# Runs inside the pipeline image: imports every module the program imports, function bodies included
# (a KFP component's imports are all in its body, so loading the program alone would not run them).
IMPORT_ALL = """
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
statements = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and not getattr(n, "level", 0)]
for n in statements:  # each import statement as written, wherever it is (module level or a function body)
    exec(compile(ast.Module([n], []), sys.argv[1], "exec"), {})
print(len(statements), "import statements:", "; ".join(sorted({ast.unparse(n) for n in statements}))[:400])
"""


def executor_input(name: str) -> dict:
    """An executor input with no parameters, but for cleanup: the local engine and an empty working store,
    so it runs to the end (no success markers, no processes of this run to stop)."""
    params = {}
    if name == "exec-cleanup":
        params = {"engine": "local", "work_uri": "/tmp/smoke-work", "run_id": "smoke"}
    return {"inputs": {"parameterValues": params, "artifacts": {}},
            "outputs": {"outputFile": "/tmp/kfp/output_metadata.json", "parameters": {}, "artifacts": {}}}


def smoke_pipeline(ref: str, work: Path) -> None:
    import yaml

    cfg = image_config(ref)
    spec = next(yaml.safe_load_all((ROOT / "pipeline.yaml").read_text()))
    executors = spec["deploymentSpec"]["executors"]
    with container(ref) as ctr:
        r = run_in(ctr, cfg["Entrypoint"] + cfg["Cmd"])
        record("pipeline", f"{' '.join(cfg['Entrypoint'] + cfg['Cmd'])}", r)
        r = run_in(ctr, cfg["Entrypoint"] + ["k8s", "check", "--help"])
        if r.returncode != 0 and "invalid choice: 'check'" in r.stderr:
            RESULTS.append(("pipeline", "bincounter k8s check --help", "NOT RUN: this build has no `k8s check`"))
            print("[pipeline] bincounter k8s check --help: NOT RUN (the subcommand is not in this build)")
        else:
            record("pipeline", "bincounter k8s check --help", r)
        programs = work / "programs"
        programs.mkdir()
        for name, executor in sorted(executors.items()):
            c = executor["container"]
            if c["image"] != ref:
                raise SmokeFailure(f"{name} runs {c['image']}, not the pipeline image {ref}")
            # The exact command KFP runs: sh writes the embedded program, then kfp.dsl.executor_main.
            argv = c["command"] + [json.dumps(executor_input(name)) if a == "{{$}}" else a for a in c["args"]]
            r = run_in(ctr, argv)
            out = r.stdout + r.stderr
            function = c["args"][c["args"].index("--function_to_execute") + 1]
            if name == "exec-cleanup":
                record("pipeline", f"{function}: KFP command, local engine, empty store (runs to the end)", r,
                       detail=(r.stdout.strip().splitlines() or [""])[-1][:120])
            else:
                # No parameters given: kfp loads the program, finds the function and calls it, which fails
                # on the first missing required argument (and on nothing before it).
                loaded = r.returncode != 0 and f"TypeError: {function}() missing" in out
                error = next((ln.strip() for ln in out.splitlines() if ln.startswith("TypeError")), "")
                record("pipeline", f"{function}: KFP command loads and calls the component (no inputs given)",
                       r, ok=loaded, detail=error[:120])
            program = programs / f"{function}.py"
            program.write_text(c["command"][-1])  # sh -ec SCRIPT PROGRAM: the script writes $0
            r = run_in(ctr, ["python3", "-c", IMPORT_ALL, f"/programs/{program.name}"],
                       [f"type=bind,src={programs},dst=/programs,ro"])
            record("pipeline", f"{function}: every import of its source", r, detail=r.stdout.strip()[:160])


# ---------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    refs = {role: images.image(role) for role in images.IMAGES}
    for arg in argv:
        role, _, ref = arg.partition("=")
        if role not in refs or not ref:
            raise SystemExit(f"error: expected ROLE=REFERENCE with ROLE one of {', '.join(refs)}; got {arg!r}")
        refs[role] = ref
    if os.geteuid() != 0:
        raise SystemExit("error: image-smoke needs root (buildah with chroot isolation)")
    if not shutil.which("buildah"):
        raise SystemExit("error: buildah is not installed (Debian: apt-get install buildah)")
    missing = [ref for ref in refs.values()
               if buildah("inspect", "--type", "image", ref, check=False).returncode != 0]
    if missing:
        raise SystemExit(f"error: not built: {', '.join(missing)}. Run `make images BUILDER=buildah` first.")
    if os.environ.get(NETNS_FLAG) != "1":  # re-run in a private network namespace: only loopback
        os.execvpe("unshare", ["unshare", "--net", "--", sys.executable, __file__, *argv],
                   {**os.environ, NETNS_FLAG: "1"})
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bincounter-smoke.", dir="/var/tmp"))
    os.chmod(work, 0o755)
    try:
        model = smoke_trainer(refs["trainer"], work)
        smoke_server(refs["server"], model, work)
        smoke_pipeline(refs["pipeline"], work)
    except SmokeFailure as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"\nimage-smoke summary ({time.monotonic() - start:.0f} s, storage driver {STORAGE_DRIVER}):")
        for role, check, outcome in RESULTS:
            print(f"  {role:8} {check}: {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
