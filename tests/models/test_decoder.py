"""MAE decoder: each visible token must meet its own unit's position embedding."""

import torch

from ummae.masking import UniformMasking
from ummae.models.decoder import MAEDecoder

GRID = (8, 8)


def reference_prediction(dec: MAEDecoder, features: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """What a depth-0 decoder must output: visible unit u <- its token + pos[u]; others <- mask + pos."""
    tokens = dec.embed_visible(features)  # [B, N_vis, D], block order
    B, n_vis, D = tokens.shape
    out = []
    for b in range(B):
        slots = dec.mask_token[0].expand(GRID[0] * GRID[1], D).clone()
        for k in range(n_vis):
            slots[ids_keep[b, k]] = tokens[b, k]
        out.append(dec.pred(dec.norm(slots + dec.pos_embed[0])))
    return torch.stack(out)


def make_decoder(upsample=2) -> MAEDecoder:
    torch.manual_seed(0)
    # depth 0: no attention mixes slots, so each output depends on its own slot only.
    return MAEDecoder(GRID, unit=8, encoder_dim=24, upsample=upsample, decoder_dim=32, depth=0, num_heads=4).eval()


def test_visible_tokens_are_paired_with_their_own_unit_position():
    dec = make_decoder()
    masks = UniformMasking(GRID)(3, generator=torch.Generator().manual_seed(0))
    features = torch.randn(3, 2, 2, 24)  # stride-32 map of the compact image: 2x2 -> 4x4 units
    with torch.no_grad():
        pred = dec(features, masks.ids_keep)
        expected = reference_prediction(dec, features, masks.ids_keep)
    torch.testing.assert_close(pred, expected)


def test_unit_row_major_ordering_is_caught():
    """Negative control: pairing tokens with positions gathered in unit row-major order (the
    ordering bug SPEC sec. 4 warns about) must not pass the reference check above."""
    dec = make_decoder()
    masks = UniformMasking(GRID)(3, generator=torch.Generator().manual_seed(0))
    features = torch.randn(3, 2, 2, 24)
    row_major = masks.ids_keep.sort(dim=1).values
    assert not torch.equal(row_major, masks.ids_keep)
    with torch.no_grad():
        wrong = dec(features, row_major)
        expected = reference_prediction(dec, features, masks.ids_keep)
    assert (wrong - expected).abs().max() > 1e-3


def test_pixel_shuffle_puts_token_parts_in_compact_raster_order():
    """Sub-pixel (i, j) of the stride-32 token at (r, c) becomes compact unit (2r+i, 2c+j), i.e.
    the token order is the compact grid's raster order = block row-major order of `ids_keep`."""
    dec = make_decoder()
    with torch.no_grad():
        dec.embed.weight.zero_()
        dec.embed.bias.copy_(torch.arange(4).repeat(32).float())  # sub-pixel i*2+j -> value i*2+j
        tokens = dec.embed_visible(torch.zeros(1, 2, 2, 24))  # [1, 16, 32]
    values = tokens[0, :, 0].view(4, 4)
    expected = torch.tensor([[0, 1], [2, 3]]).repeat(2, 2).float()
    torch.testing.assert_close(values, expected)


def test_output_covers_every_unit():
    dec = make_decoder()
    masks = UniformMasking(GRID)(2, generator=torch.Generator().manual_seed(3))
    pred = dec(torch.randn(2, 2, 2, 24), masks.ids_keep)
    assert pred.shape == (2, 64, 8 * 8 * 3)
