import os, sys, time, resource, subprocess
sys.path.insert(0, __import__('os').path.dirname(__import__('os').path.abspath(__file__)) + '/../..')
from pathlib import Path
import bench.deploy.ext4write as e
work = Path('/var/tmp/ae4-reuse'); work.mkdir(exist_ok=True)
e.remove_fs(work)
m = e.make_fs(sys.argv[1], work, 7 << 30)
buf = memoryview(bytearray(os.urandom(8 << 20)))
def write(name, chunk, n=2 << 30):
    fd = os.open(m / name, os.O_WRONLY | os.O_CREAT, 0o644)
    r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
    off = 0; at = 0
    while off < n:
        if at + chunk > len(buf): at = 0
        os.pwrite(fd, buf[at:at + chunk], off); off += chunk; at += chunk
    t = time.perf_counter() - t0; r1 = resource.getrusage(resource.RUSAGE_SELF)
    os.close(fd)
    return f"{t:.3f}s wall {r1.ru_stime - r0.ru_stime:.3f}s sys"
def folios():
    # large folio usage from /proc/meminfo is not shown; use vmstat
    return None
try:
    prev = None
    for rnd in range(2):
        for chunk in (10240, 65536, 1 << 20, 4 << 20):
            if prev: os.unlink(m / prev); subprocess.run(["sync"])
            time.sleep(float(sys.argv[2]))
            name = f"f{rnd}-{chunk}"
            print(f"chunk {chunk:8d} after {sys.argv[2]} s:", write(name, chunk), flush=True)
            prev = name
finally:
    e.remove_fs(work)
