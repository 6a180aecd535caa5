import os, sys, time, resource, subprocess
sys.path.insert(0, __import__('os').path.dirname(__import__('os').path.abspath(__file__)) + '/../..')
from pathlib import Path
import bench.deploy.ext4write as e
work = Path('/var/tmp/ae4-reuse'); work.mkdir(exist_ok=True)
e.remove_fs(work)
m = e.make_fs(sys.argv[1], work, 7 << 30)
buf = memoryview(bytearray(os.urandom(8 << 20)))
def write(name, n=2 << 30, chunk=1 << 20):
    fd = os.open(m / name, os.O_WRONLY | os.O_CREAT, 0o644)
    r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
    off = 0; at = 0
    while off < n:
        if at + chunk > len(buf): at = 0
        os.pwrite(fd, buf[at:at + chunk], off); off += chunk; at += chunk
    t = time.perf_counter() - t0; r1 = resource.getrusage(resource.RUSAGE_SELF)
    os.close(fd)
    return f"{t:.3f}s wall {r1.ru_stime - r0.ru_stime:.3f}s sys"
try:
    print("new file A          ", write("A"))
    print("overwrite A         ", write("A"))
    os.unlink(m / "A")
    print("new B right after rm", write("B"))
    os.unlink(m / "B"); time.sleep(10)
    print("new C 10 s after rm ", write("C"))
    os.unlink(m / "C"); subprocess.run(["sync"]); time.sleep(1)
    print("new D after rm+sync ", write("D"))
    print("sync D", subprocess.run(["bash","-c","time sync"],capture_output=True,text=True).stderr.split()[1])
    os.unlink(m / "D"); subprocess.run(["sync"])
    print("new E after sync    ", write("E"))
finally:
    e.remove_fs(work)
