"""The Jamba diagnosis of 2026-12-05 (H200), run from the repository root with the GPU site on PYTHONPATH: a tiny
Jamba, engine on/off, 4-bit or 16-bit, dt rank 4 (the matrix's) or 64: is the loss finite, and from which layer are
the hidden states not? (Its engine-on rows hit the hidden-states bug fixed in e758df3.)"""
import sys

sys.path[:0] = ["tests", "tests/train"]
import torch  # noqa: E402
from family_shapes import family_config, make_family_checkpoint  # noqa: E402

from fastload import FastModel  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

base = family_config("jamba", make_tokenizer()).to_dict()
for rank in (4, 64):
    cfg = {**base, "model_type": "jamba", "mamba_dt_rank": rank}
    p = make_family_checkpoint(f"/tmp/jamba_ck_{rank}", "jamba", config=cfg)
    for engine, lb in ((False, True), (True, True), (False, False), (True, False)):
        try:
            kw = {} if lb else dict(load_in_4bit=False)
            m, tok = FastModel.from_pretrained(str(p), dtype="bfloat16", engine=engine, store=False,
                                               device_map="cuda", **kw)
            ids = torch.randint(8, len(tok) - 8, (2, 1024), generator=torch.Generator().manual_seed(0)).cuda()
            m.train()
            out = m(input_ids=ids, labels=ids, output_hidden_states=True)
            bad = [i for i, h in enumerate(out.hidden_states) if not torch.isfinite(h).all()]
            print(f"dt_rank {rank}", "engine" if engine else "plain", "4bit" if lb else "16bit", "loss",
                  out.loss.item(), "first non-finite hidden state", bad[:1], flush=True)
            del m, out
        except Exception as e:  # noqa: BLE001 - a diagnosis prints what failed and goes on
            print(rank, engine, lb, "ERROR", type(e).__name__, str(e)[:300], flush=True)
