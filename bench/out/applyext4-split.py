import collections, re, sys
samples=[]; cur=None
for line in open(sys.argv[1]):
    if not line.strip():
        cur=None; continue
    m=re.match(r'^\s+([0-9a-f]+)\s+(.*)\s+\((.*)\)\s*$', line)
    if m and cur is not None:
        cur['frames'].append((m.group(2), m.group(3))); continue
    parts=line.rsplit(None,1)
    if len(parts)==2 and parts[1].isdigit():
        cur={'comm':parts[0].strip(),'tid':parts[1],'frames':[]}; samples.append(cur)
pids=set(sys.argv[2].split(','))
c=collections.Counter(); allc=collections.Counter()
for s in samples:
    allc['replica' if s['tid'] in pids else s['comm']]+=1
    if s['tid'] not in pids or not s['frames']: continue
    sym,dso=s['frames'][0]
    kind='kernel' if 'kernel' in dso else ('python' if 'python3' in dso else dso.split('/')[-1])
    sc=''
    for f,d in s['frames']:
        if f.startswith('__x64_sys_'): sc=f
    if kind=='kernel':
        if sym=='copy_folio_from_iter_atomic': kind='kernel: copy into the page cache'
        elif sc: kind='kernel: '+sc[10:]
    c[(s['comm'][:15],kind)]+=1
print(f"{len(samples)} samples ({len(samples)/499:.2f} cpu-s incl. idle)")
for k,n in allc.most_common(8): print(f"  {n/499:6.2f}s {k}")
print(" replica threads:")
for k,n in c.most_common(14): print(f"  {n/499:6.2f}s", k)
