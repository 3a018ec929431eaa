"""What a latency margin costs the calibrated static policies: lookup-calibrated and the family oracle
re-chosen on the run's calibration (second pass) with calibration latency quantile q <= budget
instead of p95, read on the run's test table (the same samples), for several q."""
import json, sys, statistics as st
import torch
e = json.load(open(sys.argv[1] + '/eval.json'))
m = e['meta']; T = m['config_tables']; test, cal = T['test'], T['calibration']
budgets = m['budgets']; fams = m['sample_families']; cfams = cal['families']
assert test['configs'] == cal['configs']
names = test['configs']
ta, tl = torch.tensor(test['accuracy']), torch.tensor(test['latency_ms'])
ca, cl = torch.tensor(cal['accuracy'], dtype=torch.float64), torch.tensor(cal['latency_ms'], dtype=torch.float64)
def choose(rows, q, b):
    acc = ca[rows].mean(0); lat = torch.quantile(cl, q, dim=0)  # over all calibration samples, as the family oracle's rule
    fit = [j for j in range(len(names)) if lat[j] <= b]
    if not fit: return int(lat.argmin())
    return min(fit, key=lambda j: (-float(acc[j]), float(lat[j]), j))
fam_set = sorted(set(fams))
def run(q):
    lc_a, lc_v, fo_a, fo_v = [], [], [], []
    for b in budgets:
        j = choose(list(range(len(cfams))), q, b)
        lc_a.append(float(ta[:, j].float().mean())); lc_v.append(float((tl[:, j] > b).float().mean()))
        pick = {f: choose([i for i, g in enumerate(cfams) if g == f], q, b) for f in fam_set}
        cols = torch.tensor([pick[f] for f in fams])
        idx = torch.arange(len(fams))
        fo_a.append(float(ta[idx, cols].float().mean())); fo_v.append(float((tl[idx, cols] > b).float().mean()))
    return lc_a, lc_v, fo_a, fo_v
print(f"budgets {[round(b,1) for b in budgets]}")
for q in (0.9, 0.95, 0.97, 0.98, 0.99):
    lc_a, lc_v, fo_a, fo_v = run(q)
    print(f"q {q:.2f}: LC {st.mean(lc_a):.3f} ({100*st.mean(lc_v):.1f}%, max {100*max(lc_v):.1f}%)  "
          f"FO {st.mean(fo_a):.3f} ({100*st.mean(fo_v):.1f}%, max {100*max(fo_v):.1f}%)  "
          f"FO per budget viol {[round(100*v,1) for v in fo_v]}")
rows = {(r['policy'], r['budget_ms']): r for r in e['rows']}
for p in ('lookup-calibrated', 'family-oracle'):
    print(p, 'as evaluated:', round(st.mean(rows[p, b]['accuracy_mean'] for b in budgets), 3),
          f"({100*st.mean(rows[p, b]['violation_rate'] for b in budgets):.1f}%)")
