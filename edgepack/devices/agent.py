"""Runs ON THE DEVICE, sent as `python -c <this file> OP JSON`: standard library only, Python >= 3.9.

Ops: prepare (hashes of what a kept work folder holds), install (unpack a tar from stdin, then create or
reuse the venv keyed by requirements.txt), run (a job that ends when its stdin closes), cleanup.
Prints one JSON object on stdout; a known failure is {"error": KIND, "message": ...} with exit 3.
"""
import errno
import hashlib
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import tarfile
import threading
import time


class Fail(Exception):
    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind


def _path(p):
    return os.path.abspath(os.path.expanduser(p))


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _free(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def prepare(a):
    """sha256 of the listed files already in the work folder (a kept one), None where absent."""
    work = _path(a["work"])
    hashes = {}
    for rel in a["files"]:
        p = os.path.join(work, rel)
        hashes[rel] = _sha256(p) if os.path.isfile(p) and not os.path.islink(p) else None
    return {"work": work, "hashes": hashes}


def install(a):
    """Unpack the tar on stdin (if any) into the work folder, then create or reuse the venv."""
    work = _path(a["work"])
    need, free = int(a.get("need", 0)), _free(work)
    if need > free:
        raise Fail("nospace", "no space on the device: %s free at %s; the files need %s"
                   % (_size(free), _free_at(work), _size(need)))
    os.makedirs(work, exist_ok=True)
    out = {"work": work, "extracted": extract(work) if a.get("tar") else 0}
    if a.get("requirements"):
        out["venv"] = venv({"cache": a["cache"], "requirements": os.path.join(work, a["requirements"]),
                            "pip_args": a.get("pip_args")})
    return out


def _size(n):
    return "%.0f KB" % (n / 1024.0) if n < 1 << 20 else "%.1f MB" % (n / 1048576.0)


def _free_at(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def extract(work):
    n = 0
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tf:
        for m in tf:
            parts = m.name.split("/")
            if not m.isfile() or m.name.startswith("/") or ".." in parts or "" in parts:
                raise Fail("unsafe", "refused archive member %r" % m.name)
            dest = os.path.join(work, *parts)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = dest + ".part"
            src = tf.extractfile(m)
            with open(tmp, "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
            os.chmod(tmp, 0o755 if m.mode & 0o100 else 0o644)
            os.replace(tmp, dest)
            n += 1
    return n


def _run(argv, **kw):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _tail(text, n=1):
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) if lines else "(no output)"


def _pip_failure(out, py):
    for ln in out.splitlines():
        if "No matching distribution found for" in ln:
            req = ln.split("found for", 1)[1].strip()
            raise Fail("nowheel", "no %s wheel for this device (%s, Python %s): pip found no matching distribution"
                       % (req, os.uname().machine, "%d.%d" % sys.version_info[:2]))
    if "No space left on device" in out:
        raise Fail("nospace", "no space left while installing the requirements (%s)" % _tail(out))
    raise Fail("pip", "pip install -r requirements.txt failed: %s" % _tail(out))


# Exit 0 when every "name==v" / "name>=v" line of requirements.txt is installed (no pip start-up).
SATISFIED = r"""
import re, sys
from importlib import metadata
def key(v):
    return [int(x) for x in re.findall(r"\d+", v)[:4]]
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    m = re.match(r"^([A-Za-z0-9._-]+)\s*(==|>=)\s*([0-9][0-9A-Za-z.]*)$", line)
    if not m:
        sys.exit(1)
    try:
        have = metadata.version(m.group(1))
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if (m.group(2) == "==" and key(have) != key(m.group(3))) or key(have) < key(m.group(3)):
        sys.exit(1)
"""


def _pip_install(py, req, pip_args):
    if _run([py, "-c", "import pip"]).returncode:
        r = _run([py, "-m", "ensurepip", "--default-pip"])
        if r.returncode:
            raise Fail("nopip", "no pip for %s on the device: install python3-venv and python3-pip "
                                "(Debian/Ubuntu: sudo apt install python3-venv python3-pip)" % sys.executable)
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q", "-r", req]
    r = _run(pip + ["--no-index"] + pip_args)  # offline when the wheels are already there
    if r.returncode and "--no-index" not in pip_args:
        r = _run(pip + pip_args)
    if r.returncode:
        _pip_failure(r.stdout, py)


def requirements_digest(path):
    """sha256 of the requirement lines, comments and blanks dropped, sorted: the venv's cache key."""
    with open(path) as f:
        lines = sorted(set(ln.split("#")[0].strip() for ln in f) - {""})
    return hashlib.sha256(("\n".join(lines) + "\n").encode()).hexdigest()


def _versions(py):
    code = ("import json\nfrom importlib import metadata\ndef v(n):\n    try:\n        return metadata.version(n)\n"
            "    except Exception:\n        return None\n"
            "print(json.dumps({n: v(n) for n in ('numpy', 'onnxruntime', 'openvino')}))")
    r = _run([py, "-c", code])
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


def venv(a):
    cache, req = _path(a["cache"]), _path(a["requirements"])
    digest = requirements_digest(req)
    who = os.path.realpath(sys.executable)
    root = os.path.join(cache, "venvs")
    target = os.path.join(root, digest[:16])
    marker = os.path.join(target, "edgepack-venv.json")
    vpy = os.path.join(target, "bin", "python")
    if os.path.isfile(marker):
        with open(marker) as f:
            info = json.load(f)
        if info.get("python") == who and os.path.exists(vpy):
            return {"path": target, "python": vpy, "created": False, "runtimes": info.get("runtimes") or {}}
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, ".%s-%d-%d" % (digest[:16], os.getpid(), int(time.time() * 1000)))
    try:
        r = _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", tmp])
        if r.returncode:
            if "No space left" in r.stdout:
                raise Fail("nospace", "no space left to create the venv in %s" % root)
            raise Fail("venv", "python -m venv failed: %s (install python3-venv)" % _tail(r.stdout))
        if sys.prefix != getattr(sys, "base_prefix", sys.prefix):
            # the configured python is itself a venv: let the new venv see its packages too
            ver = "python%d.%d" % sys.version_info[:2]
            with open(os.path.join(tmp, "lib", ver, "site-packages", "_edgepack_parent.pth"), "w") as f:
                f.write("\n".join(site.getsitepackages()) + "\n")
        tpy = os.path.join(tmp, "bin", "python")
        if _run([tpy, "-c", SATISFIED, req]).returncode:  # pip only when something is missing
            _pip_install(tpy, req, list(a.get("pip_args") or []))
        runtimes = _versions(tpy)
        with open(os.path.join(tmp, "edgepack-venv.json"), "w") as f:
            json.dump({"python": who, "requirements_sha256": digest, "runtimes": runtimes}, f)
        if os.path.isdir(target):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another run made it first
            shutil.rmtree(tmp, ignore_errors=True)
        return {"path": target, "python": vpy, "created": True, "runtimes": runtimes}
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def run(a):
    """Run a job; end it (its whole process group) when our stdin closes: the SSH session is gone."""
    pids = os.path.join(_path(a["work"]), ".pids")
    os.makedirs(pids, exist_ok=True)
    p = subprocess.Popen(a["argv"], cwd=_path(a["cwd"]), stdin=subprocess.DEVNULL, start_new_session=True)
    pidfile = os.path.join(pids, str(p.pid))
    with open(pidfile, "w") as f:
        f.write(str(p.pid))

    def stop(code):
        _killpg(p.pid)
        os._exit(code)

    def watch():
        while sys.stdin.buffer.read(65536):
            pass
        stop(129)

    t = threading.Thread(target=watch)
    t.daemon = True
    t.start()
    signal.signal(signal.SIGTERM, lambda *_: stop(143))
    signal.signal(signal.SIGHUP, lambda *_: stop(129))
    try:
        code = p.wait(timeout=float(a.get("deadline", 3600)))
    except subprocess.TimeoutExpired:
        sys.stderr.write("error: the job ran past its deadline and was stopped\n")
        _killpg(p.pid)
        code = 124
    try:
        os.remove(pidfile)
    except OSError:
        pass
    sys.stdout.flush()
    os._exit(code)


def _killpg(pid):
    for sig, pause in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 0)):
        try:
            os.killpg(pid, sig)
        except OSError:
            return
        end = time.time() + pause
        while time.time() < end:
            try:
                os.killpg(pid, 0)
            except OSError:
                return
            time.sleep(0.05)


def cleanup(a):
    work = _path(a["work"])
    pids = os.path.join(work, ".pids")
    if os.path.isdir(pids):
        for name in os.listdir(pids):
            if name.isdigit():
                _killpg(int(name))
    if not a.get("remove", True):
        shutil.rmtree(pids, ignore_errors=True)
        return {"removed": False}
    shutil.rmtree(work, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(work))  # the work/ folder itself, when empty
    except OSError:
        pass
    return {"removed": not os.path.exists(work)}


OPS = {"prepare": prepare, "install": install, "run": run, "cleanup": cleanup}


def main():
    op, args = sys.argv[1], json.loads(sys.argv[2])
    try:
        result = OPS[op](args)
    except Fail as e:
        result, code = {"error": e.kind, "message": str(e)}, 3
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        result, code = {"error": "nospace", "message": "no space left on device: %s" % (e.filename or e)}, 3
    else:
        code = 0
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
