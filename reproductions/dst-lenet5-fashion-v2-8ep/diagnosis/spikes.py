import json, sys
for f in sys.argv[1:]:
    d = json.load(open(f))
    T = {r['step']: r for r in d['trace']}
    out = []
    for h in d['history']:
        s = h['step']
        if h['kind'] == 'init' or s + 10 not in T: continue
        before = sum(T[s - k]['loss'] for k in range(0, 10)) / 10
        after = max(T[s + k]['loss'] for k in range(1, 11))
        out.append(f"{s}:{before:.2f}->{after:.1f}")
    ep = [round(e['test_acc'] * 100, 2) for e in d['epochs']]
    print(f.split('/')[-1], 'test acc per epoch', ep, d['error'] or '')
    print('   swaps (mean loss 10 steps before -> max loss 10 after):', ' '.join(out[:10]))
