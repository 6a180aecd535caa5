import ctypes, mmap, time, sys
libc = ctypes.CDLL(None)
n = 2 << 30
for i in range(3):
    m = mmap.mmap(-1, n)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    t = time.perf_counter(); libc.memset(ctypes.c_void_p(addr), 1, ctypes.c_size_t(n)); t1 = time.perf_counter() - t
    t = time.perf_counter(); libc.memset(ctypes.c_void_p(addr), 2, ctypes.c_size_t(n)); t2 = time.perf_counter() - t
    print(f"first touch {t1:.3f}s ({n/t1/1e9:.2f} GB/s) second {t2:.3f}s ({n/t2/1e9:.2f} GB/s)")
    del addr
    m.close()
    time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
