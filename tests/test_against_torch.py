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
    blocks = [w[..., k * H : (k + 1) * H] for k in range(4)]
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
                    bias_hh[2 * H :] = torch.from_numpy(p[f"rnn.{i}.bias_h"])
            if cfg.tie_weights:
                self.dec.weight = self.emb.weight
            else:
                self.dec.weight.copy_(torch.from_numpy(p["decoder.weight"].T))
            self.dec.bias.copy_(torch.from_numpy(p["decoder.bias"]))

    def forward(self, x, state):
        out, state = self.lstm(self.emb(x), state)
        return self.dec(out), state


@pytest.mark.parametrize(
    "tied,layers,cell", [(False, 1, "lstm"), (True, 2, "lstm"), (True, 2, "gru"), (False, 2, "rnn")]
)
def test_training_matches_pytorch(tied, layers, cell):
    """Three windows of SGD with clipping, state carried: every loss agrees to float64 precision."""
    cfg = ModelConfig(
        emb_size=16, hidden_size=16, num_layers=layers, tie_weights=tied, init="pytorch", forget_bias=1.0, cell=cell
    )
    V, T, B = 50, 7, 4
    ours = LanguageModel(cfg, V, seed=5, dtype="float64")
    ref = TorchLM(ours, cfg, V)
    # the bias PyTorch has twice is trained once, as in lmtrain (the GRU's b_hn part excepted)
    H = cfg.hidden_size
    for i in range(layers):
        if cell == "gru":
            getattr(ref.lstm, f"bias_hh_l{i}").register_hook(lambda g: torch.cat([g[: 2 * H] * 0, g[2 * H :]]))
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
        x, y = stream[k * T : (k + 1) * T], stream[k * T + 1 : (k + 1) * T + 1]
        logits, state = ours.forward(x, state, train=True)
        loss = ours.loss(logits, y).mean
        ours.backward()
        norm = grad_norm(ours.store)
        sgd.step(0.5, clip_scale(norm, 0.1))

        if tstate is not None:
            tstate = tuple(s.detach() for s in tstate) if isinstance(tstate, tuple) else tstate.detach()
        tlogits, tstate = ref(torch.from_numpy(x.astype(np.int64)), tstate)
        tloss = torch.nn.functional.cross_entropy(
            tlogits.reshape(-1, V), torch.from_numpy(y.astype(np.int64)).reshape(-1)
        )
        opt.zero_grad()
        tloss.backward()
        tnorm = torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        assert loss == pytest.approx(tloss.item(), rel=1e-10)
        assert norm == pytest.approx(tnorm.item(), rel=1e-8)
    np.testing.assert_allclose(ours.params["embedding.weight"], ref.emb.weight.detach().numpy(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("tied_head", [False, True])
def test_adaptive_softmax_matches_pytorch(tied_head):
    """Loss, the whole table of log-probabilities and every gradient against AdaptiveLogSoftmaxWithLoss on
    the same weights.  The mapping: PyTorch's head lists the c_0 words first and the clusters after them
    (lmtrain: clusters first), its Linear layers multiply by W^T, and its projections have d // div^(i+1)
    units as lmtrain's do.  Its tails have no bias; replacing each tail's output layer by one with a bias
    gives the equivalent model (its forward calls the tail modules as they are)."""
    from tests.test_adaptive import adaptive_layer

    d, V, cutoffs, div = 16, 60, [8, 20, 35], 2.0
    K = len(cutoffs)
    ours = adaptive_layer(d, V, cutoffs, div, seed=21, tied_head=tied_head)
    ref = torch.nn.AdaptiveLogSoftmaxWithLoss(d, V, cutoffs, div_value=div, head_bias=True).double()
    head_rows = lambda a: a if tied_head else a.T  # noqa: E731  (K + c_0, d): one row per head column
    torch_order = lambda a: np.concatenate([a[K:], a[:K]])  # noqa: E731  clusters first -> words first
    with torch.no_grad():
        ref.head.weight.copy_(torch.from_numpy(torch_order(head_rows(ours.params["head.weight"]))))
        ref.head.bias.copy_(torch.from_numpy(torch_order(ours.params["head.bias"])))
        for i, tail in enumerate(ref.tail):
            T = ours.params[f"tail.{i}.weight"]
            tail[0].weight.copy_(torch.from_numpy(ours.params[f"tail.{i}.proj"].T))
            tail[1] = torch.nn.Linear(*T.shape).double()
            tail[1].weight.copy_(torch.from_numpy(T.T))
            tail[1].bias.copy_(torch.from_numpy(ours.params[f"tail.{i}.bias"]))
    rng = np.random.default_rng(22)
    h = rng.standard_normal((40, d))
    targets = np.concatenate([[0, 7, 8, 19, 20, 34, 35, 59], rng.integers(0, V, size=32)])  # every cluster's edges
    th = torch.from_numpy(h).requires_grad_(True)
    result = ref(th, torch.from_numpy(targets))
    result.loss.backward()

    assert ours.forward(h, targets)[0] == pytest.approx(result.loss.item(), rel=1e-12)
    dh = ours.backward()
    np.testing.assert_allclose(ours.log_probs(h), ref.log_prob(th).detach().numpy(), rtol=1e-12, atol=1e-12)
    close = lambda a, b: np.testing.assert_allclose(a, b.grad.numpy(), rtol=1e-9, atol=1e-12)  # noqa: E731
    close(dh, th)
    close(torch_order(head_rows(ours.grads["head.weight"])), ref.head.weight)
    close(torch_order(ours.grads["head.bias"]), ref.head.bias)
    for i, tail in enumerate(ref.tail):
        close(ours.grads[f"tail.{i}.proj"].T, tail[0].weight)
        close(ours.grads[f"tail.{i}.weight"].T, tail[1].weight)
        close(ours.grads[f"tail.{i}.bias"], tail[1].bias)
