"""Small configs of every architecture (key -> (name, scale, config)), at scales whose upsampling tails differ:
the model cases that tests/nn/test_conv_packing.py and tests/test_autocast.py run (tests/models' SMALL holds
the per-architecture configs of the model tests themselves)."""

SMALL_MODELS = {
    "srcnn": ("srcnn", 3, {}),
    "srdensenet": ("srdensenet", 4, dict(num_features=32, num_blocks=2, num_layers=3, growth=8, bottleneck=16)),
    "rcan": ("rcan", 2, dict(n_resgroups=2, n_resblocks=2, n_feats=16, reduction=4)),
    "rcan_bam": ("rcan", 4, dict(bam=True, n_resgroups=2, n_resblocks=2, n_feats=16, reduction=4)),
    "rdn": ("rdn", 4, dict(num_features=16, num_blocks=2, num_layers=3, growth=8)),
    "rdcab_ipiu": ("rdcab", 2, dict(num_features=16, growth=16, num_layers=3, num_recursions=2, num_blocks=2)),
    "rdcab_split": ("rdcab", 4, dict(variant="split", num_features=16, growth=16, num_layers=3, num_recursions=2)),
    "rdcab_fd_irb": ("rdcab", 3, dict(variant="fd_irb", num_features=16, growth=16, num_layers=3,
                                      num_recursions=2)),
}
