"""Prompt networks: shapes, class conditioning, objectness, semi-automatic concatenation."""

from __future__ import annotations

import pytest
import torch

from automedsam.prompt_networks import build_prompt_network, decoder_prompts, default_config


@pytest.fixture(params=["ppn", "diffusion"])
def kind(request):
    return request.param


def features_for(backbone, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return backbone.encode(torch.rand(n, backbone.input_size, backbone.input_size, 3, generator=g))


def test_output_shapes_follow_the_papers(tiny_backbone, kind):
    b = tiny_backbone
    gen = build_prompt_network(kind, default_config(kind, b, 3)).eval()
    feats = features_for(b)
    emb = feats.embeddings[[0, 0, 1]]
    out = gen(emb, b.dense_pe(), torch.tensor([0, 1, 2]))
    e, low = b.embedding_size, b.mask_size
    assert out.object_logit.shape == (3,)
    if kind == "ppn":
        assert out.sparse.shape == (3, gen.config.num_tokens - 2, 256)
        assert out.box.shape == (3, 4) and out.mask_prompt.shape == (3, 1, low, low)
        assert (out.box >= 0).all() and (out.box <= 1).all()
        assert (out.box[:, :2] <= out.box[:, 2:]).all()  # x0 <= x1, y0 <= y1
        assert out.dense is None
    else:
        # k sparse tokens = what the backbone's own prompt encoder gives a box (the MSE teacher).
        teacher_sparse, teacher_dense = b.embed_prompts(boxes=torch.tensor([[10.0, 10.0, 100.0, 120.0]]))
        assert out.sparse.shape == (3, teacher_sparse.shape[1], 256)
        assert out.dense.shape == (3, 256, e, e) == (3, *teacher_dense.shape[1:])
    sparse, dense = decoder_prompts(b, out)
    decoded = b.decode(type(feats)(emb, tuple(h[[0, 0, 1]] for h in feats.high_res)), sparse, dense)
    assert decoded.mask_logits.shape == (3, 1, low, low)


def test_outputs_depend_on_the_class(tiny_backbone, kind):
    b = tiny_backbone
    gen = build_prompt_network(kind, default_config(kind, b, 3)).eval()
    emb = features_for(b, 1).embeddings.expand(2, -1, -1, -1)
    out = gen(emb, b.dense_pe(), torch.tensor([0, 2]))
    assert not torch.allclose(out.sparse[0], out.sparse[1])
    assert out.object_logit[0] != out.object_logit[1]


def test_diffusion_noise_only_in_training(tiny_sam):
    gen = build_prompt_network("diffusion", default_config("diffusion", tiny_sam, 2))
    emb = features_for(tiny_sam, 1).embeddings
    idx = torch.tensor([1])
    gen.eval()
    a, b = gen(emb, None, idx), gen(emb, None, idx)
    torch.testing.assert_close(a.dense, b.dense)  # inference: no noise, deterministic
    gen.train()
    sigma = gen.noise_sigma(1000, "cpu", torch.Generator().manual_seed(0))
    assert sigma.max() <= 1.0 and sigma.min() >= 1.0 / 1000  # sigma_t = 1/(t+1), t in 0..999
    c = gen(emb, None, idx, rng=torch.Generator().manual_seed(1))
    d = gen(emb, None, idx, rng=torch.Generator().manual_seed(2))
    assert not torch.allclose(c.dense, d.dense)


def test_semi_automatic_mode_concatenates_manual_prompts(tiny_backbone, kind):
    b = tiny_backbone
    gen = build_prompt_network(kind, default_config(kind, b, 2)).eval()
    out = gen(features_for(b, 1).embeddings, b.dense_pe(), torch.tensor([1]))
    auto_sparse, _ = decoder_prompts(b, out)
    pts, lbl = torch.tensor([[[50.0, 60.0], [100.0, 30.0]]]), torch.tensor([[1, 0]])
    semi_sparse, semi_dense = decoder_prompts(b, out, pts, lbl)
    manual_sparse, manual_dense = decoder_prompts(b, None, pts, lbl)
    assert manual_sparse.shape[1] >= 2
    n_learned = out.sparse.shape[1]
    if kind == "ppn":
        torch.testing.assert_close(semi_sparse[:, -n_learned:], out.sparse)  # learned tokens appended
        assert semi_sparse.shape[1] > auto_sparse.shape[1]
    else:
        torch.testing.assert_close(semi_sparse[:, :n_learned], out.sparse)
        torch.testing.assert_close(semi_sparse[:, n_learned:], manual_sparse)
        torch.testing.assert_close(semi_dense, out.dense)
    # Manual-only mode is exactly the backbone's own prompt encoder (plain SAM).
    ref_sparse, ref_dense = b.embed_prompts(pts, lbl)
    torch.testing.assert_close(manual_sparse, ref_sparse)
    torch.testing.assert_close(manual_dense, ref_dense)


def test_gradients_reach_the_generator_but_not_the_frozen_encoder(tiny_backbone, kind):
    b = tiny_backbone
    gen = build_prompt_network(kind, default_config(kind, b, 2)).train()
    feats = features_for(b, 1)
    out = gen(feats.embeddings, b.dense_pe(), torch.tensor([0]))
    sparse, dense = decoder_prompts(b, out)
    loss = b.decode(feats, sparse, dense).mask_logits.sigmoid().mean() + out.object_logit.sum()
    loss.backward()
    grads = [p.grad for p in gen.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2
    assert all(p.grad is None for p in b.model.image_encoder.parameters())
