"""Train ONE (variant, seed, sparsity) cell of a comparison config with per-step tracing.

usage: diag.py CONFIG LABEL SEED SPARSITY OUT.json [--old-seeds] [--set k=v ...] [--threads N]
--old-seeds: data order / trainer seed = seed*1000 + index (index of SPARSITY in the
config's sparsities, from 1), as before 2026-11-30 (README table's runs).
"""
import argparse, json, math, sys, time
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "src"))
from secateurs.experiments.compare import load_comparison, experiment_configs
from secateurs.experiments import sweep as S
from secateurs.data import load_dataset
from secateurs.train import Trainer, build_optimizer
from secateurs.seeding import derive_seed
import yaml

ap = argparse.ArgumentParser()
ap.add_argument("config"); ap.add_argument("label"); ap.add_argument("seed", type=int)
ap.add_argument("sparsity", type=float); ap.add_argument("out")
ap.add_argument("--old-seeds", action="store_true")
ap.add_argument("--set", action="append", default=[])
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--trace-every", type=int, default=1)
ap.add_argument("--stop-at", type=int, default=0)
ap.add_argument("--param", action="append", default=[])
a = ap.parse_args()
torch.set_num_threads(a.threads)
ov = {}
for kv in a.set:
    k, v = kv.split("=", 1); ov[k] = yaml.safe_load(v)
if a.param:
    raw = yaml.safe_load(open(a.config))
    for v in raw["variants"]:
        if v["label"] == a.label:
            for kv in a.param:
                k, val = kv.split("=", 1); v.setdefault("params", {})[k] = yaml.safe_load(val)
    import tempfile, os
    fd, tmpcfg = tempfile.mkstemp(suffix=".yaml"); os.write(fd, yaml.safe_dump(raw).encode()); os.close(fd)
    a.config = tmpcfg
comp = load_comparison(a.config, ov)
cfgs = [c for (l, s, c) in experiment_configs(comp) if l == a.label and s == a.seed]
assert cfgs, (a.label, a.seed)
config = cfgs[0]
index = list(config.prune.sparsities).index(a.sparsity) + 1 if a.label != "dense" else 0
dataset = load_dataset(config.data.dataset, config.data.root)
data = S._Data(config, dataset)
phase = f"sparsity-{a.sparsity:g}" if a.label != "dense" else "dense"
seed = (config.seed * 1000 + index) if a.old_seeds else derive_seed(config.seed, "sweep", phase)
model = S.build_model(config, dataset).to(data.device)
train_data = data.train(seed)
optimizer = build_optimizer(model, config.train.optimizer)
total = len(train_data) * config.train.epochs
sp = None
if a.label != "dense":
    sp = S.build_sparsifier(config, model, optimizer, sparsity=a.sparsity, total_steps=total,
                            steps_per_epoch=len(train_data), batches=data.probe)
cfg = S._train_config(config.train, config, seed, health="mark")
trace = []
losses = []
def loss_fn(m, logits, y):
    l = torch.nn.functional.cross_entropy(logits, y)
    losses.append((l.detach(), logits.detach().abs().max()))
    return l
names = [n for n, p in model.named_parameters() if p.dim() > 1]
def after(tr):
    step = tr.state.step + 1
    if step % a.trace_every and step > 30:
        return
    gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    l, lm = losses[-1]
    rec = {"step": step, "loss": l.item(), "logit_max": lm.item(), "lr": tr.optimizer.param_groups[0]["lr"],
           "grad_norm": gn}
    rec["wnorm"] = {n: p.detach().norm().item() for n, p in model.named_parameters() if p.dim() > 1}
    trace.append(rec)
def step_cb(tr):
    losses.clear() if len(losses) > 2 else None
    if a.stop_at and tr.state.step >= a.stop_at:
        tr.stop()
epochs = []
t0 = time.time()
trainer = Trainer(model, train_data, cfg, eval_data=data.test, optimizer=optimizer, sparsifier=sp,
                  callbacks=[lambda r: (epochs.append(dict(r)), print(json.dumps(r), flush=True))],
                  step_callbacks=[step_cb], after_step=[after], loss_fn=loss_fn, progress=False)
err = None
try:
    trainer.fit()
except Exception as e:
    err = f"{type(e).__name__}: {e}"
    print(err)
wall = time.time() - t0
final = trainer.evaluate(data.test)
out = {"param": a.param, "label": a.label, "seed": a.seed, "sparsity": a.sparsity, "old_seeds": a.old_seeds, "set": a.set,
       "data_seed": seed, "epochs": epochs, "final": final, "error": err, "wall_s": wall,
       "trace": trace, "history": sp.history if sp else [], "health": trainer.health,
       "final_sparsity": sp.stats()["sparsity"] if sp else 0.0, "layers": {n: v["sparsity"] for n, v in sp.stats()["layers"].items()} if sp else {}}
json.dump(out, open(a.out, "w"))
print("FINAL", a.label, a.seed, a.sparsity, a.set, "acc", final["acc"], "sparsity", out["final_sparsity"], "err", err, "wall", round(wall, 1))
