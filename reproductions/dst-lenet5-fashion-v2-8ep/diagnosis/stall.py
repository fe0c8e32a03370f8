"""Dense LeNet-5 on Fashion-MNIST, first STEPS steps, for many (init seed, data seed) pairs:
how often does a given LR setting die (loss stuck at ln 10)?"""
import argparse, json, sys, time
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "src"))
from secateurs.experiments.compare import load_comparison, experiment_configs
from secateurs.experiments import sweep as S
from secateurs.data import load_dataset
from secateurs.train import Trainer, build_optimizer
from secateurs.seeding import derive_seed
import yaml
ap = argparse.ArgumentParser()
ap.add_argument("--set", action="append", default=[])
ap.add_argument("--steps", type=int, default=150)
ap.add_argument("--pairs", default="new")  # new | old | extra
ap.add_argument("--out")
ap.add_argument("--label", default="dense")
ap.add_argument("--sparsity", type=float, default=0.98)
ap.add_argument("--config", default=str(__import__("pathlib").Path(__file__).resolve().parents[3] / "configs" / "dst_lenet5_fashion.yaml"))
ap.add_argument("--dead-only", action="store_true")
a = ap.parse_args()
torch.set_num_threads(1)
ov = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set)}
comp = load_comparison(a.config, ov)
config = [c for (l, s, c) in experiment_configs(comp) if l == a.label and s == 0][0]
dataset = load_dataset(config.data.dataset, config.data.root)
data = S._Data(config, dataset)
phases = ["dense", "sparsity-0.9", "sparsity-0.95", "sparsity-0.98"]
pairs = []
for s in (0, 1, 2):
    for i, ph in enumerate(phases):
        if a.pairs == "new": pairs.append((s, derive_seed(s, "sweep", ph), ph))
        elif a.pairs == "old": pairs.append((s, s * 1000 + i, ph))
        else: pairs.append((s, derive_seed(s, "extra", ph), ph))
res = []
import os
if os.environ.get("ONLY_SEED"): pairs = [p for p in pairs if p[0] == int(os.environ["ONLY_SEED"])]
if a.dead_only:
    pairs = [(2, 2002, "old sparsity-0.95"), (1, derive_seed(1, "sweep", "sparsity-0.9"), "new sparsity-0.9"), (2, derive_seed(2, "extra", "sparsity-0.9"), "extra sparsity-0.9"), (2, derive_seed(2, "extra", "sparsity-0.98"), "extra sparsity-0.98")]
t0 = time.time()
for s, ds, ph in pairs:
    from dataclasses import replace
    cfg_s = replace(config, seed=s)
    model = S.build_model(cfg_s, dataset)
    losses = []
    def loss_fn(m, logits, y):
        l = torch.nn.functional.cross_entropy(logits, y); losses.append(l.detach()); return l
    def cb(tr):
        if tr.state.step >= a.steps: tr.stop()
    cfg = S._train_config(config.train, cfg_s, ds, health="off")
    td = data.train(ds)
    sp = None
    if a.label != "dense":
        opt = build_optimizer(model, config.train.optimizer)
        sp = S.build_sparsifier(cfg_s, model, opt, sparsity=a.sparsity, total_steps=len(td) * config.train.epochs, steps_per_epoch=len(td), batches=data.probe)
        tr = Trainer(model, td, cfg, optimizer=opt, sparsifier=sp, loss_fn=loss_fn, step_callbacks=[cb], progress=False)
    else:
        tr = Trainer(model, td, cfg, loss_fn=loss_fn, step_callbacks=[cb], progress=False)
    tr.fit()
    L = torch.stack(losses).float()
    tail = L[-50:].mean().item()
    half = L[len(L)//2:].mean().item(); first_below = next((i for i, v in enumerate(L.tolist()) if v < 2.0), None)
    res.append({"seed": s, "data_seed": ds, "phase": ph, "tail_loss": tail, "max_loss": L.max().item(), "dead": tail > 2.2, "half": half, "first_below_2": first_below})
    print(s, ph, "2nd-half", round(half, 3), "first step <2.0:", first_below, round(tail, 3), round(L.max().item(), 2), "DEAD" if tail > 2.2 else "", flush=True)
print("SUMMARY", a.set, a.pairs, "dead", sum(r["dead"] for r in res), "/", len(res), "wall", round(time.time() - t0))
if a.out: json.dump(res, open(a.out, "w"))
