"""The numpy model against PyTorch's nn.LSTM, an independent implementation (skipped without torch)."""
import numpy as np
import pytest

from lmtrain.config import ModelConfig
from lmtrain.nn.model import LanguageModel
from lmtrain.optim import SGD, clip_scale, grad_norm
from tests.conftest import optional

torch = optional("torch", "pip install torch==2.13.0 (the bench extra)")

# lmtrain's gate blocks are f, i, o, g; PyTorch's are i, f, g, o.
TORCH_ORDER = [1, 0, 3, 2]


def to_torch_gates(w, H):
    """(D, 4H) in f,i,o,g column blocks -> (4H, D) in PyTorch's row blocks."""
    blocks = [w[..., k * H:(k + 1) * H] for k in range(4)]
    return np.concatenate([blocks[k] for k in TORCH_ORDER], axis=-1).T


class TorchLM(torch.nn.Module):
    def __init__(self, model, cfg, V):
        super().__init__()
        H, E = cfg.hidden_size, cfg.emb_size
        p = {k: v.astype(np.float64) for k, v in model.params.items()}
        self.emb = torch.nn.Embedding(V, E)
        kind = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cfg.cell]
        self.lstm = kind(E, H, num_layers=cfg.num_layers)
        self.dec = torch.nn.Linear(H, V)
        self.double()
        # LSTM gates are reordered (f,i,o,g -> i,f,g,o); the GRU's r,z,n and the RNN's single block match.
        gates = (lambda w: to_torch_gates(w, H)) if cfg.cell == "lstm" else (lambda w: w.T)
        with torch.no_grad():
            self.emb.weight.copy_(torch.from_numpy(p["embedding.weight"]))
            for i in range(cfg.num_layers):
                getattr(self.lstm, f"weight_ih_l{i}").copy_(torch.from_numpy(gates(p[f"rnn.{i}.weight_x"])))
                getattr(self.lstm, f"weight_hh_l{i}").copy_(torch.from_numpy(gates(p[f"rnn.{i}.weight_h"])))
                getattr(self.lstm, f"bias_ih_l{i}").copy_(torch.from_numpy(gates(p[f"rnn.{i}.bias"])))
                # lmtrain has one bias (the GRU adds b_hn); PyTorch's second copy holds only that
                bias_hh = getattr(self.lstm, f"bias_hh_l{i}")
                bias_hh.zero_()
                if cfg.cell == "gru":
                    bias_hh[2 * H:] = torch.from_numpy(p[f"rnn.{i}.bias_h"])
            if cfg.tie_weights:
                self.dec.weight = self.emb.weight
            else:
                self.dec.weight.copy_(torch.from_numpy(p["decoder.weight"].T))
            self.dec.bias.copy_(torch.from_numpy(p["decoder.bias"]))

    def forward(self, x, state):
        out, state = self.lstm(self.emb(x), state)
        return self.dec(out), state


@pytest.mark.parametrize("tied,layers,cell", [(False, 1, "lstm"), (True, 2, "lstm"), (True, 2, "gru"),
                                             (False, 2, "rnn")])
def test_training_matches_pytorch(tied, layers, cell):
    """Three windows of SGD with clipping, state carried: every loss agrees to float64 precision."""
    cfg = ModelConfig(emb_size=16, hidden_size=16, num_layers=layers, tie_weights=tied, init="pytorch",
                      forget_bias=1.0, cell=cell)
    V, T, B = 50, 7, 4
    ours = LanguageModel(cfg, V, seed=5, dtype="float64")
    ref = TorchLM(ours, cfg, V)
    # the bias PyTorch has twice is trained once, as in lmtrain (the GRU's b_hn part excepted)
    H = cfg.hidden_size
    for i in range(layers):
        if cell == "gru":
            getattr(ref.lstm, f"bias_hh_l{i}").register_hook(lambda g: torch.cat([g[:2 * H] * 0, g[2 * H:]]))
        else:
            getattr(ref.lstm, f"bias_hh_l{i}").requires_grad_(False)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    rng = np.random.default_rng(0)
    stream = rng.integers(0, V, size=(3 * T + 1, B)).astype(np.int32)
    sgd = SGD(ours.store)
    state = ours.init_state(B)
    tstate = None
    for k in range(3):
        x, y = stream[k * T:(k + 1) * T], stream[k * T + 1:(k + 1) * T + 1]
        logits, state = ours.forward(x, state, train=True)
        loss = ours.loss(logits, y)
        ours.backward()
        norm = grad_norm(ours.store)
        sgd.step(0.5, clip_scale(norm, 0.1))

        if tstate is not None:
            tstate = tuple(s.detach() for s in tstate) if isinstance(tstate, tuple) else tstate.detach()
        tlogits, tstate = ref(torch.from_numpy(x.astype(np.int64)), tstate)
        tloss = torch.nn.functional.cross_entropy(tlogits.reshape(-1, V), torch.from_numpy(y.astype(np.int64)).reshape(-1))
        opt.zero_grad()
        tloss.backward()
        tnorm = torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        assert loss == pytest.approx(tloss.item(), rel=1e-10)
        assert norm == pytest.approx(tnorm.item(), rel=1e-8)
    np.testing.assert_allclose(ours.params["embedding.weight"], ref.emb.weight.detach().numpy(), rtol=1e-8, atol=1e-10)
