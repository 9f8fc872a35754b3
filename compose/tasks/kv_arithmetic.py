"""Key-value arithmetic, the synthetic task of CALM (Bansal et al., arXiv 2401.02412, Table 1).

An augmenting model m_A memorises a table ``key -> value``; an anchor m_B does
arithmetic on numbers; neither can evaluate ``k17 + k3 =``. Their composition is
trained on expressions over a fraction (20%) of the keys and evaluated on expressions
over the *held-out* keys, which only m_A knows.

Every key and every number is one token, so no tokenizer is needed (records are
``{"input_ids", "labels"}``, what :meth:`compose.Composer.fit` takes as is):

===========  ==========================================================
ids          meaning
===========  ==========================================================
0, 1, 2      pad, bos, eos
3, 4, 5      ``+``, ``-``, ``=``
6 ...        the integers ``-(V-1) ... 2(V-1)`` (every possible answer)
after those  the keys ``k0 ... k{K-1}``, each with a value in ``0 ... V-1``
===========  ==========================================================

Record kinds (each ends in ``= answer eos``; the loss is on ``answer eos`` only):

* ``numeric``: ``a + b = c``, ``a - b = c`` and ``a = a`` over numbers (m_B's skill);
* ``kv_arith``: ``k_i + k_j = v_i + v_j`` and ``k_i - k_j = v_i - v_j``;
* ``kv_subst``: ``k_i = v_i`` (KV-substitution);
* ``kv_first`` / ``kv_second``: ``k_i op n`` / ``n op k_i``, one key, first or second
  operand (diagnostics: which operand position the composition can fill in);
* :meth:`KVArithmetic.memory_records`: m_A's training rows ``k v k v ...``, loss on the
  values, so that m_A holds a key's value *at the key token* in any context.

>>> task = KVArithmetic(num_keys=20, num_values=8)
>>> rec = task.records("kv_arith", 1, keys="heldout", seed=0)[0]
>>> task.decode(rec["input_ids"]).endswith("eos")
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..data.padding import pad_batch

__all__ = ["KVArithmetic", "answer_accuracy", "memory_accuracy"]

PAD, BOS, EOS, PLUS, MINUS, EQ = range(6)
_OPS = {PLUS: "+", MINUS: "-", EQ: "="}
_KINDS = ("numeric", "kv_arith", "kv_subst", "kv_first", "kv_second")


@dataclass
class KVArithmetic:
    """The vocabulary, the key table and seeded generators of the task.

    Attributes:
        num_keys: how many keys m_A memorises.
        num_values: values (and operands) are ``0 ... num_values - 1``.
        train_fraction: fraction of the keys the composition is trained on (CALM: 20%); the
            split gives every value at least one training key (when there are enough of them).
        seed: fixes the key -> value table and the train / held-out split.
    """

    num_keys: int = 512
    num_values: int = 32
    train_fraction: float = 0.2
    seed: int = 0
    values: list[int] = field(init=False, repr=False)
    train_keys: list[int] = field(init=False, repr=False)
    heldout_keys: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_keys < 2 or self.num_values < 2:
            raise ValueError("num_keys and num_values must be at least 2")
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        rng = random.Random(self.seed)
        self.values = [rng.randrange(self.num_values) for _ in range(self.num_keys)]
        order = list(range(self.num_keys))
        rng.shuffle(order)
        n_train = max(1, round(self.train_fraction * self.num_keys))
        # Every value gets a training key first (the first of its keys in the shuffled order), then
        # the rest in that order: a held-out key whose value no training key has cannot be read by
        # a map fitted on the training keys (with a plain random split 0-9% of the held-out keys
        # were such, capping held-out KV-arithmetic at 82-100% whatever the composition).
        first: dict[int, int] = {}
        for k in order:
            first.setdefault(self.values[k], k)
        chosen = set(list(first.values())[:n_train])
        train = [*chosen, *(k for k in order if k not in chosen)][:n_train]
        self.train_keys = sorted(train)
        self.heldout_keys = sorted(set(order) - set(train))

    # ------------------------------------------------------------------ vocabulary
    @property
    def min_number(self) -> int:
        return -(self.num_values - 1)

    @property
    def max_number(self) -> int:
        return 2 * (self.num_values - 1)

    @property
    def first_key_id(self) -> int:
        return 6 + self.max_number - self.min_number + 1

    @property
    def vocab_size(self) -> int:
        return self.first_key_id + self.num_keys

    def number(self, n: int) -> int:
        """Token id of the integer ``n``."""
        if not self.min_number <= n <= self.max_number:
            raise ValueError(f"{n} is outside the numbers {self.min_number} ... {self.max_number}")
        return 6 + n - self.min_number

    def key(self, i: int) -> int:
        """Token id of key ``i``."""
        return self.first_key_id + i

    @property
    def key_ids(self) -> list[int]:
        return [self.key(i) for i in range(self.num_keys)]

    def decode(self, ids) -> str:
        out = []
        for t in (int(x) for x in ids):
            if t in (PAD, BOS, EOS):
                out.append(("pad", "bos", "eos")[t])
            elif t in _OPS:
                out.append(_OPS[t])
            elif t < self.first_key_id:
                out.append(str(t - 6 + self.min_number))
            else:
                out.append(f"k{t - self.first_key_id}")
        return " ".join(out)

    # ------------------------------------------------------------------ data
    def _keys(self, keys: str | list[int]) -> list[int]:
        if isinstance(keys, str):
            if keys not in ("train", "heldout", "all"):
                raise ValueError(f"keys must be 'train', 'heldout', 'all' or a list, got {keys!r}")
            return {"train": self.train_keys, "heldout": self.heldout_keys}.get(keys, list(range(self.num_keys)))
        return list(keys)

    def records(self, kind: str, n: int, *, keys: str | list[int] = "train", seed: int = 0) -> list[dict]:
        """``n`` expressions of ``kind`` (``numeric``, ``kv_arith``, ``kv_subst``).

        Each record has ``input_ids``, ``labels`` (loss on the answer and eos only) and
        ``answer_pos``, the index of the answer token.
        """
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
        rng = random.Random(f"{self.seed}/{kind}/{seed}")
        pool = self._keys(keys)
        V = self.num_values
        out = []
        for _ in range(n):
            if kind == "kv_subst":
                k = rng.choice(pool)
                lhs, ans = [self.key(k)], self.values[k]
            else:
                op = PLUS if rng.random() < 0.5 else MINUS
                if kind == "numeric":
                    if rng.random() < 0.1:  # a = a: the anchor's KV-substitution skill
                        a = rng.randrange(V)
                        lhs, ans = [self.number(a)], a
                        out.append(self._record(lhs, ans))
                        continue
                    a, b = rng.randrange(V), rng.randrange(V)
                    ta, tb = self.number(a), self.number(b)
                elif kind == "kv_arith":
                    i, j = rng.choice(pool), rng.choice(pool)
                    a, b = self.values[i], self.values[j]
                    ta, tb = self.key(i), self.key(j)
                else:
                    i, n = rng.choice(pool), rng.randrange(V)
                    if kind == "kv_first":
                        a, b, ta, tb = self.values[i], n, self.key(i), self.number(n)
                    else:
                        a, b, ta, tb = n, self.values[i], self.number(n), self.key(i)
                lhs, ans = [ta, op, tb], a + b if op == PLUS else a - b
            out.append(self._record(lhs, ans))
        return out

    def _record(self, lhs: list[int], answer: int) -> dict:
        ids = [BOS, *lhs, EQ, self.number(answer), EOS]
        labels = [-100] * (len(ids) - 2) + ids[-2:]
        return {"input_ids": ids, "labels": labels, "answer_pos": len(ids) - 2}

    def unknown_records(self, n: int, *, seed: int = 0) -> list[dict]:
        """m_B's rows with *unknown* operands: ``KEY op b``, ``a op KEY``, ``KEY op KEY``, ``KEY = ?``.

        ``KEY`` is key 0's token (after :meth:`blind_to_keys_` every key reads the same); the
        answer is computed from a random value in its place, so in expectation the anchor learns
        the *uniform* distribution over the answers a key could give: a key means "some number",
        which is what a pretrained LM makes of an unknown variable. Without it the anchor is
        confidently wrong at a key, and the gradient there is nearly orthogonal to the way to the
        right number (docs/results.md, section 2).
        """
        rng = random.Random(f"{self.seed}/unknown/{seed}")
        V, key = self.num_values, self.key(0)
        out = []
        for _ in range(n):
            a, b = rng.randrange(V), rng.randrange(V)
            if rng.random() < 0.1:
                out.append(self._record([key], a))
                continue
            op = PLUS if rng.random() < 0.5 else MINUS
            which = rng.randrange(3)  # 0: first unknown, 1: second, 2: both
            ta = key if which in (0, 2) else self.number(a)
            tb = key if which in (1, 2) else self.number(b)
            out.append(self._record([ta, op, tb], a + b if op == PLUS else a - b))
        return out

    def memory_records(self, n: int, *, pairs: int = 16, keys: str | list[int] = "all", seed: int = 0) -> list[dict]:
        """m_A's training rows ``bos k v k v ...`` (random keys), loss on the values only."""
        rng = random.Random(f"{self.seed}/memory/{seed}")
        pool = self._keys(keys)
        out = []
        for _ in range(n):
            ids, labels = [BOS], [-100]
            for _ in range(pairs):
                k = rng.choice(pool)
                ids += [self.key(k), self.number(self.values[k])]
                labels += [-100, self.number(self.values[k])]
            out.append({"input_ids": ids, "labels": labels})
        return out

    def mix_operands(
        self,
        model: torch.nn.Module,
        p: float = 0.3,
        max_weight: float = 0.3,
        *,
        key_p: float = 0.0,
        key_max_weight: float = 0.9,
    ):
        """While ``model`` trains, blend some operand embeddings; returns the hook handle.

        Each operand (a number token before ``=``) is, with probability ``p``, fed as
        ``(1 - w) * emb(a) + w * emb(r)`` with ``r`` a random operand and ``w ~ U(0, max_weight)``,
        while the target stays the answer for ``a``. The anchor then answers from the dominant
        number of a blend, so its input space is meaningful *between* number embeddings, as
        a pretrained LM's is, and not only at the ``2V - 1`` points it was trained on.

        With ``key_p > 0``, an operand not blended that way is, with probability ``key_p``,
        fed as ``(1 - w) * emb(a) + w * emb(key)`` instead, ``w ~ U(0, key_max_weight)``,
        ``emb(key)`` being the one embedding every key shares after :meth:`blind_to_keys_`
        (held fixed: no gradient reaches it through the blend). The anchor then reads a
        number even from a faint trace of it on top of the key embedding, so the straight
        path from a key to its value's embedding, the path a composition writing into the
        anchor's input starts on, is one the loss can follow from its first step
        (``docs/results.md``, section 2). In eval mode the hook does nothing; call
        ``.remove()`` on the handle when training is done.
        """
        if not 0 <= p <= 1 or not 0 <= max_weight < 0.5:
            raise ValueError(f"need 0 <= p <= 1 and 0 <= max_weight < 0.5, got p={p}, max_weight={max_weight}")
        if not 0 <= key_p <= 1 or not 0 <= key_max_weight < 1:
            raise ValueError(
                f"need 0 <= key_p <= 1 and 0 <= key_max_weight < 1, got key_p={key_p}, key_max_weight={key_max_weight}"
            )
        lo, hi = self.number(0), self.number(self.num_values - 1)
        key = self.key(0)

        def hook(module, args, output):
            if not module.training:
                return None
            ids = args[0]
            before_eq = (ids == EQ).long().cumsum(1) == 0
            operand = (ids >= lo) & (ids <= hi) & before_eq
            draw = torch.rand(ids.shape, device=ids.device)
            pick = operand & (draw < p)
            other = torch.nn.functional.embedding(torch.randint_like(ids, lo, hi + 1), module.weight)
            w = (torch.rand(ids.shape, device=ids.device) * max_weight)[..., None].to(output.dtype)
            out = torch.where(pick[..., None], (1 - w) * output + w * other, output)
            if key_p > 0:
                to_key = operand & ~pick & (torch.rand(ids.shape, device=ids.device) < key_p)
                wk = (torch.rand(ids.shape, device=ids.device) * key_max_weight)[..., None].to(output.dtype)
                k = module.weight[key].detach().to(output.dtype)
                out = torch.where(to_key[..., None], (1 - wk) * output + wk * k, out)
            return out

        return model.get_input_embeddings().register_forward_hook(hook)

    @torch.no_grad()
    def blind_to_keys_(self, model: torch.nn.Module) -> torch.nn.Module:
        """Give every key one shared input embedding, so ``model`` cannot tell keys apart.

        The anchor never trains on keys; with one embedding for all of them (an
        ``<unk>``), whatever it knows about a key can only come from the composition.
        Rows that get no gradient stay equal under AdamW (equal decay, zero update).
        """
        emb = model.get_input_embeddings().weight
        ids = torch.tensor(self.key_ids)
        emb[ids] = emb[ids[0]].clone()
        return model


@torch.no_grad()
def answer_accuracy(model: torch.nn.Module, records: list[dict], *, batch_size: int = 256) -> float:
    """Exact match of the greedy answer token (the only answer token), in [0, 1].

    The answer is one token, so greedy decoding's first new token after ``=`` is the
    argmax of the logits at the ``=`` position; one batched forward pass computes it.
    """
    was_training = model.training
    model.eval()
    correct = 0
    try:
        device = next(model.parameters()).device
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            ids, mask = pad_batch([rec["input_ids"][: rec["answer_pos"]] for rec in chunk], PAD)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            last = mask.sum(1) - 1
            pred = logits[torch.arange(len(chunk)), last.to(device)].argmax(-1).cpu()
            gold = torch.tensor([rec["input_ids"][rec["answer_pos"]] for rec in chunk])
            correct += int((pred == gold).sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(records))


@torch.no_grad()
def memory_accuracy(model: torch.nn.Module, records: list[dict], *, batch_size: int = 256) -> float:
    """Fraction of value tokens that ``model`` predicts exactly in :meth:`KVArithmetic.memory_records` rows."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        device = next(model.parameters()).device
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            ids = torch.tensor([r["input_ids"] for r in chunk], device=device)
            labels = torch.tensor([r["labels"] for r in chunk], device=device)
            pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
            gold = labels[:, 1:]
            keep = gold != -100
            correct += int((pred[keep] == gold[keep]).sum())
            total += int(keep.sum())
    finally:
        model.train(was_training)
    return correct / max(1, total)
