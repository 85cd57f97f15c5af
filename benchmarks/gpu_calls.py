#!/usr/bin/env python3
"""The two calls on the GPU machine, one script each (see `benchmarks/gpu_kit.py prepare`, which prints the exact `run`
arguments, and benchmarks/README.md).

  call A  python3 benchmarks/gpu_calls.py a --limit-s 200   carry .kit/whl .kit/lite0 .kit/meta
          stages the wheels and the Lite0 weights under /tmp/reid_kit, then: smoke test (imports and versions, one
          bf16 training step with fused Adam on the GPU-resident cached path, a 2-epoch demo run), (d) evaluation and
          re-ranking at Market-1501 size, (e) a 1M x 2048 gallery search
  call B  python3 benchmarks/gpu_calls.py b --limit-s 510   carry .kit/whl .kit/market .kit/meta   (within 30 s of A)
          (a) throughput (bare step vs fit, cached and PIL paths, synchronising calls), (c) EfficientNet-Lite0 from its
          package weights, 20 epochs, (b) the paper recipe, ResNet-50 from scratch, for the rest of the call (the
          epochs that fit, schedule scaled, last one evaluated)

Only the standard library here: this script runs before the wheels are installed. Each measurement is its own
process with its own time limit: one that fails or overruns is recorded and the next one runs. Everything streams
into $OUT as it is produced (PYTHONUNBUFFERED, one log line at a time, records appended): a call killed at its limit
loses only what was still running. At most 7 files per call, none near 16 MiB (the log stops growing at 15 MiB).
Every record carries device, date, command and commit (from .kit/meta/kit.json: the copy on the device has no .git).

`--rehearse` runs the same steps on the CPU with the demo data and tiny sizes (tests/test_gpu_kit.py does it in a
stand-in of the device's Python).
"""
import argparse, datetime, glob, json, os, shutil, signal, subprocess, sys, tarfile, threading, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LOG = 15 * 2**20


class Call:
    "One call: its log and records in $OUT, its deadline, the staging folder it shares with the other call"
    def __init__(self, name, a):
        self.name, self.a, self.t0 = name, a, time.monotonic()
        self.deadline = self.t0 + a.limit_s
        out = os.environ.get('OUT')
        if not out: sys.exit(f"gpu_calls {name}: $OUT is not set (the device tool sets it; set it to a folder to try this here)")
        self.out = Path(out); self.out.mkdir(parents=True, exist_ok=True)
        self.kit, self.stage = (REPO/a.kit).resolve(), Path(a.stage)
        self.site, self.cache, self.runs = self.stage/'site', self.stage/'cache', self.stage/'runs'
        self._log = open(self.out/f'{name}.log', 'a', buffering=1)
        self.meta = self._read_meta()
        self.commit = self.meta.get('commit', 'unknown') + ('+dirty' if self.meta.get('dirty') else '')
        self.python = os.environ.get('KIT_PYTHON', 'python3')   # the device's python3 (the rehearsal's stand-in)

    def _read_meta(self):
        f = self.kit/'meta'/'kit.json'
        try: return json.loads(f.read_text())
        except (OSError, ValueError): return {}

    def left(self): return self.deadline - time.monotonic()
    def log(self, msg):
        line = f"[{self.name} {time.monotonic() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        if self._log.tell() < MAX_LOG: self._log.write(line + '\n')

    def record(self, **kw):
        "Append one JSON record (device, date, command, commit added) to $OUT/<call>_records.jsonl"
        rec = dict(call=self.name, date=datetime.datetime.now().isoformat(timespec='seconds'), commit=self.commit,
                   device=getattr(self, 'device', None), **kw)
        with open(self.out/f'{self.name}_records.jsonl', 'a') as f: f.write(json.dumps(rec, default=str) + '\n')

    def env(self):
        e = dict(os.environ, PYTHONUNBUFFERED='1', REID_FASTAI_CACHE=str(self.cache), MPLBACKEND='Agg',
                 PYTHONPATH=os.pathsep.join([str(REPO), str(self.site)] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])))
        return e

    def step(self, name, args, limit, keep_s=0):
        "Run `python3 args` with a time limit (at most what the call has left, less `keep_s`), streaming its output to the log"
        limit = min(limit, self.left() - keep_s)
        if limit < 10:
            self.log(f"{name}: SKIPPED, {self.left():.0f}s left in the call"); self.record(step=name, status='skipped', left_s=round(self.left()))
            return None
        cmd = [self.python] + [str(x) for x in args]
        self.log(f"{name}: {' '.join(cmd[1:])} (limit {limit:.0f}s)")
        t, killed = time.monotonic(), []
        p = subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1, start_new_session=True, errors='replace')
        def kill():
            killed.append(True)
            try: os.killpg(p.pid, signal.SIGKILL)   # the step and any processes it started
            except ProcessLookupError: pass
        timer = threading.Timer(limit, kill); timer.start()
        try:
            for line in p.stdout: self.log(f"  {line.rstrip()}")
            p.wait()
        finally: timer.cancel()
        timed_out = bool(killed)
        rc, secs = p.returncode, round(time.monotonic() - t, 1)
        status = 'timeout' if timed_out else ('ok' if rc == 0 else f'failed (exit {rc})')
        self.log(f"{name}: {status} in {secs}s")
        self.record(step=name, status=status, seconds=secs, command=' '.join(cmd))
        return rc == 0 and not timed_out

    def install_wheels(self):
        wheels = sorted(glob.glob(str(self.kit/'whl'/'*.whl')))
        if not wheels: self.log(f"no wheels in {self.kit/'whl'}: run `python benchmarks/gpu_kit.py prepare` here first"); return False
        self.site.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([self.python, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile', '--no-cache-dir',
                            '--upgrade', '--target', str(self.site)] + wheels, capture_output=True, text=True)
        self.log(f"wheels: {len(wheels)} installed in {self.site}" if r.returncode == 0 else f"wheels: pip FAILED: {r.stderr[-500:]}")
        return r.returncode == 0

    def versions(self):
        "One line with python, torch, CUDA, GPU: also the device name for the records"
        code = ("import json, platform, torch; print(json.dumps(dict(python=platform.python_version(), torch=torch.__version__, "
                "cuda=torch.version.cuda, device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')))")
        r = subprocess.run([self.python, '-c', code], env=self.env(), capture_output=True, text=True, timeout=120)
        try: v = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError): v = dict(error=r.stderr[-300:])
        self.device = v.get('device')
        self.log(f"versions: {v}")
        return v


def call_a(a):
    c = Call('a', a)
    c.log(f"call A: commit {c.commit}, kit {c.kit}, stage {c.stage}, limit {a.limit_s}s{' (rehearsal on the CPU)' if a.rehearse else ''}")
    ok = c.install_wheels()
    lite = sorted(glob.glob(str(c.kit/'lite0'/'*.pth')))
    c.cache.mkdir(parents=True, exist_ok=True)
    for f in lite: shutil.copy(f, c.cache/Path(f).name)   # where `pretrained='lite0'` looks (REID_FASTAI_CACHE)
    c.log(f"Lite0 weights: {'staged in ' + str(c.cache) if lite else 'MISSING from ' + str(c.kit/'lite0')}")
    c.record(step='stage', wheels=ok, lite0=bool(lite), versions=c.versions())
    (c.stage/'staged.json').write_text(json.dumps(dict(commit=c.commit, wheels=ok, lite0=bool(lite), time=time.time())))
    dev = 'cpu' if a.rehearse else 'cuda'
    c.step('smoke', ['benchmarks/gpu_smoke.py', '--device', dev, '--out', c.out/'smoke.json', '--commit', c.commit,
                     '--runs', c.runs] + (['--size', '64', '32'] if a.rehearse else []), 150)
    c.step('eval_speed', ['benchmarks/eval_speed.py', '--device', dev, '--out', c.out/'eval_speed.txt', '--commit', c.commit]
           + (['--scale', '0.05', '--repeat', '1'] if a.rehearse else ['--repeat', '3']), 90)
    c.step('search_speed', ['benchmarks/search_speed.py', '--device', dev, '--out', c.out/'search_speed.txt', '--commit', c.commit]
           + (['--n', '20000', '--repeat', '1'] if a.rehearse else ['--n', '1000000', '--repeat', '3']), 120)
    c.log(f"call A done in {time.monotonic() - c.t0:.0f}s: START CALL B NOW (the machine keeps /tmp only ~30 s)")


def call_b(a):
    c = Call('b', a)
    staged = c.stage/'staged.json'
    try: st = json.loads(staged.read_text())
    except (OSError, ValueError): st = None
    if st is None or st.get('commit') != c.commit:
        why = 'nothing staged' if st is None else f"staged by commit {st.get('commit')}, this kit is {c.commit}"
        msg = (f"gpu_calls b: COLD MACHINE ({why} in {c.stage}): call A did not run on this machine or it was given back; "
               + ("--cold-ok: installing the wheels here and skipping Lite0 (c)" if a.cold_ok else
                  "exiting. Run call A again, then B within 30 s (or B with --cold-ok to run (a) and (b) without Lite0)"))
        c.log(msg)
        if not a.cold_ok: c.record(step='cold', status='exit', message=msg); sys.exit(3)
        if not c.install_wheels(): sys.exit(3)
    c.log(f"call B: commit {c.commit}, limit {a.limit_s}s{' (rehearsal on the CPU)' if a.rehearse else ''}")
    c.versions()
    market = unpack_market(c)
    if market is None: sys.exit(2)
    dev = 'cpu' if a.rehearse else 'cuda'
    tiny = ['--size', '64', '32', '--p', '4', '--k', '4'] if a.rehearse else []
    common = ['--pipeline', 'cached', '--results', c.out, '--curves', '--commit', c.commit] + tiny   # not --quiet: one line per epoch
    if a.rehearse: common += ['--device', 'cpu', '--eval-every', '2']
    # (a) throughput: ResNet-50 256x128 P16xK4 bf16 (rehearsal: resnet18, 64x32)
    c.step('throughput', ['benchmarks/throughput.py', '--data', market, '--device', dev, '--out', c.out/'throughput.json',
                          '--commit', c.commit] + (tiny + ['--arch', 'resnet18', '--steps', '2', '--skip', 'data', 'overhead']
                                                   if a.rehearse else ['--steps', '60', '--skip', 'data']), 150, keep_s=240)
    # (c) Lite0 from its package weights, 20 epochs (rehearsal: 2), with a time guard
    lite_ok = json.loads(staged.read_text()).get('lite0') if st else False
    if lite_ok:
        c.step('lite0', ['benchmarks/train_market.py', market, '--init', 'lite0', '--epochs', '2' if a.rehearse else '20',
                         '--max-minutes', '0.5' if a.rehearse else '2.2', '--out', c.runs/'lite0'] + common, 170, keep_s=150)
    else: c.log("lite0: SKIPPED (no Lite0 weights staged by call A)"); c.record(step='lite0', status='skipped: no weights')
    # (b) the paper recipe from scratch: the epochs that fit in what is left (start-up, cache load and export kept aside)
    minutes = (0.25 if a.rehearse else max(0.5, (c.left() - 45) / 60))
    c.step('paper_r50', ['benchmarks/train_market.py', market, '--init', 'scratch', '--epochs', '40' if a.rehearse else '120',
                         '--max-minutes', f"{minutes:.2f}", '--out', c.runs/'paper_r50']
           + (['--arch', 'resnet18'] if a.rehearse else []) + common, c.left() - 5)
    c.log(f"call B done in {time.monotonic() - c.t0:.0f}s: give the machine back now")


def unpack_market(c):
    "Market-1501 from the carried archive (junk images left out by `gpu_kit.py prepare`), unpacked once under the stage"
    dest = c.stage/'data'
    found = sorted(dest.glob('*/bounding_box_train'))
    if found: c.log(f"Market-1501: already unpacked in {found[0].parent}"); return str(found[0].parent)
    archives = sorted(glob.glob(str(c.kit/'market'/'*.tar.xz')))
    if not archives: c.log(f"Market-1501: no archive in {c.kit/'market'} (carry .kit/market)"); return None
    t = time.monotonic(); dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archives[0]) as tf: tf.extractall(dest, filter='data') if hasattr(tarfile, 'data_filter') else tf.extractall(dest)
    found = sorted(dest.glob('*/bounding_box_train'))
    c.log(f"Market-1501: unpacked {Path(archives[0]).name} in {time.monotonic() - t:.1f}s -> {found[0].parent if found else '?'}")
    return str(found[0].parent) if found else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('call', choices=['a', 'b'])
    ap.add_argument('--limit-s', type=float, default=None, help="the call's time limit, as given to `run` (default: A 200, B 510)")
    ap.add_argument('--kit', default='.kit', help='the carried kit folder (relative to the repository)')
    ap.add_argument('--stage', default='/tmp/reid_kit', help='where call A stages for call B (kept while the machine is warm)')
    ap.add_argument('--rehearse', action='store_true', help='the same steps on the CPU, demo data, tiny sizes')
    ap.add_argument('--cold-ok', action='store_true', help='call B on a machine call A did not prepare: run without Lite0')
    a = ap.parse_args(argv)
    a.limit_s = a.limit_s or (200 if a.call == 'a' else 510)
    a.limit_s -= 10   # finish inside the tool's limit: the last lines and files must still be written
    (call_a if a.call == 'a' else call_b)(a)


if __name__ == '__main__': main()
