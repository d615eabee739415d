"""Training batches of bank rows (``BankRows``): the values of a per-row gather, bit for bit, with less host work."""

from __future__ import annotations

import pytest
import torch
from test_bank import build, make_config, make_models

from difftune_control.bank import BankRows, load_bank
from difftune_control.bank.rows import resident_rows

IDX = torch.tensor([4, 0, 4, 2, 1])  # a repeat and an unsorted order, as torch.randint draws them


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    """Two tiny real banks of 5 rows: hints extracted from the images, and all-zero hints."""
    folder = tmp_path_factory.mktemp("bank-rows")
    models = make_models(folder / "tokenizer")
    return {
        "extracted": load_bank(build(models, make_config(folder / "extracted"))),
        "zero": load_bank(build(models, make_config(folder / "zero", bank_hint="zero"), extractor=None)),
    }


def per_row(ds, idx: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """The straightforward reference: ``__getitem__`` row by row, the posterior noise one [n,C,h,w] draw."""
    items = [ds[int(i)] for i in idx]
    out = {
        k: torch.stack([item[k] for item in items])
        for k in ("encoder_hidden_states", "conditioning_pixel_values")
    }
    latents = torch.stack([item["latents"] for item in items])
    if generator is not None:
        noise = torch.randn(latents.shape, generator=generator)
        latents = torch.stack(
            [latents[j] + ds.latent_std[int(i)].float() * noise[j] for j, i in enumerate(idx)]
        )
    return {**out, "latents": latents}


@pytest.mark.parametrize("hint", ["extracted", "zero"])
@pytest.mark.parametrize("latents", ["mean", "sample"])
def test_batch_is_the_per_row_gather_bit_for_bit(banks, hint, latents):
    ds = banks[hint]
    assert ds.rows.zero_hints == (hint == "zero")
    if hint == "extracted":
        assert int(ds.hints.sum()) > 0  # the comparison covers real hint values
    seed = 11
    gen = torch.Generator().manual_seed(seed) if latents == "sample" else None
    batch = ds.batch(IDX, posterior_generator=gen)
    ref_gen = torch.Generator().manual_seed(seed) if latents == "sample" else None
    ref = per_row(ds, IDX, ref_gen)
    assert set(batch) == {"latents", "encoder_hidden_states", "conditioning_pixel_values"}
    for key, value in ref.items():
        assert batch[key].dtype == torch.float32 and torch.equal(batch[key], value), key
    if gen is not None:  # the same draws, in the same order: the run's generator continues alike
        assert torch.equal(torch.rand(8, generator=gen), torch.rand(8, generator=ref_gen))
        assert not torch.equal(batch["latents"], ds.batch(IDX)["latents"])


class Untouchable:
    """Stands in for a bank's hint tensor that must not be read: any use raises; only its shape is told
    (all ``BankRows`` reads at construction)."""

    def __init__(self, like: torch.Tensor):
        self.__dict__["shape"] = like.shape

    def __getattr__(self, name):
        raise AssertionError(f"the hints were read (.{name})")

    def __getitem__(self, index):
        raise AssertionError("the hints were indexed")


def test_zero_hint_batches_never_read_the_hints(banks):
    ds = banks["zero"]
    expected = ds.batch(IDX, posterior_generator=torch.Generator().manual_seed(3))
    ds.rows.hints = Untouchable(ds.hints)
    try:
        batch = ds.batch(IDX, posterior_generator=torch.Generator().manual_seed(3))
    finally:
        ds.rows.hints = ds.hints
    for key, value in expected.items():
        assert torch.equal(batch[key], value), key
    assert batch["conditioning_pixel_values"].shape == (len(IDX), *ds.hints.shape[1:])
    # the stand-in does catch a read: a bank not declared zero-hint reads its hints
    rows = BankRows(ds.latents, ds.latent_std, ds.encoder_hidden_states, Untouchable(ds.hints))
    with pytest.raises(AssertionError, match="the hints were"):
        rows.batch(IDX)


def test_added_conditioning_rows_follow_the_indices():
    """SDXL banks carry ``text_embeds`` and ``time_ids``: gathered like the other rows, dtype kept."""
    n = 6
    g = torch.Generator().manual_seed(0)
    rows = BankRows(
        torch.randn(n, 4, 2, 2, generator=g),
        torch.rand(n, 4, 2, 2, generator=g).half(),
        torch.randn(n, 3, 5, generator=g).half(),
        torch.zeros(n, 3, 4, 4, dtype=torch.uint8),
        {"text_embeds": torch.randn(n, 7, generator=g), "time_ids": torch.randn(n, 6, generator=g)},
        zero_hints=True,
    )
    assert len(rows) == n
    batch = rows.batch(IDX)
    assert list(batch) == [
        "latents",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
        "conditioning_pixel_values",
    ]
    for key in ("text_embeds", "time_ids"):
        assert torch.equal(batch[key], rows.added[key][IDX]), key
    assert torch.equal(batch["encoder_hidden_states"], rows.encoder_hidden_states[IDX].float())
    assert torch.equal(batch["conditioning_pixel_values"], torch.zeros(len(IDX), 3, 4, 4))


def test_resident_rows_fill_the_budget_in_order():
    sizes = {"latents": 40, "latent_std": 20, "encoder_hidden_states": 50, "text_embeds": 5, "hints": 100}
    assert resident_rows(sizes, 215) == list(sizes)
    assert resident_rows(sizes, 114) == ["latents", "latent_std", "encoder_hidden_states"]
    assert resident_rows(sizes, 100) == ["latents", "latent_std", "text_embeds"]  # too large: skipped
    assert resident_rows(sizes, 0) == []


def seeded(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


@pytest.mark.gpu
@pytest.mark.parametrize("share", [0.02, 0.0])
@pytest.mark.parametrize("hint", ["extracted", "zero"])
def test_cuda_batches_equal_the_cpu_batches(banks, hint, share, monkeypatch):
    """Resident on the GPU (the default share) or gathered through pinned memory (share 0): the CPU values."""
    from difftune_control.bank import rows as rows_mod

    monkeypatch.setattr(rows_mod, "RESIDENT_SHARE", share)
    ds = banks[hint]
    ds.rows._stores.clear()
    try:
        store = ds.rows.store(torch.device("cuda", torch.cuda.current_device()))
        assert all((v.device.type == "cuda") == (share > 0) for v in store.values())
        for seed in (None, 5):
            on_gpu = ds.batch(IDX, "cuda", posterior_generator=seeded(seed))
            on_cpu = ds.batch(IDX, "cpu", posterior_generator=seeded(seed))
            for key, value in on_cpu.items():
                assert on_gpu[key].device.type == "cuda" and torch.equal(on_gpu[key].cpu(), value), key
    finally:
        ds.rows._stores.clear()
