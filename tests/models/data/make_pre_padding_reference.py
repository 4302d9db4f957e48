"""Reference outputs of the pre-padding code (commit a7d1fb4) at sizes that need no padding."""
import torch
from ummae.models.swin import SwinTransformer
from ummae.models.pvt import PyramidVisionTransformer
from ummae.masking import UniformMasking
torch.set_num_threads(1)
torch.manual_seed(0)
swin = SwinTransformer(embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4), window_size=4).eval()
torch.manual_seed(0)
pvt = PyramidVisionTransformer(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 2), mlp_ratios=(2, 2, 2, 2)).eval()
x = torch.randn(2, 3, 64, 128, generator=torch.Generator().manual_seed(1))
m = UniformMasking((8, 16), 0.25)(2, generator=torch.Generator().manual_seed(2))
with torch.no_grad():
    ref = dict(swin_full=swin.forward_features(x), swin_masked=swin.forward_masked(x, m, 8),
               pvt_full=pvt.forward_features(x), pvt_masked=pvt.forward_masked(x, m, 8))
torch.save(ref, "tests/models/data/pre_padding_reference.pt")
print({k: tuple(v.shape) for k, v in ref.items()})
