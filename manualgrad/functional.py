"""manualgrad.functional: the torch.nn.functional names, signatures and defaults, each
backed by a Function with a hand-written backward (manualgrad/ops/<family>.py).

    import manualgrad.functional as F
    loss = F.cross_entropy(F.linear(x, w, b), target)
"""
# Each op family adds its names here, one import block per family.

# linear
from .ops.linear import linear

# bilinear
from .ops.bilinear import bilinear

# activation
from .ops.activation import elu, gelu, glu, hardswish, leaky_relu, mish, relu, sigmoid, silu, softplus, tanh

# more activations (hardtanh ... softmin)
from .ops.activation_slopes import prelu, rrelu, rrelu_
from .ops.activation_more import (
    celu,
    celu_,
    hardshrink,
    hardsigmoid,
    hardtanh,
    hardtanh_,
    logsigmoid,
    relu6,
    selu,
    selu_,
    softmin,
    softshrink,
    softsign,
    tanhshrink,
    threshold,
    threshold_,
)

# distances and normalization
from .ops.distance import cosine_similarity, normalize, pairwise_distance, pdist

# softmax
from .ops.softmax import log_softmax, softmax

# dropout
from .ops.dropout import dropout

# more dropouts (alpha, feature alpha, channel-wise)
from .ops.dropout_more import alpha_dropout, dropout1d, dropout2d, dropout3d, feature_alpha_dropout

# regression losses
from .ops.regression_loss import huber_loss, l1_loss, mse_loss, smooth_l1_loss

# binary and distribution losses
from .ops.binary_loss import binary_cross_entropy, binary_cross_entropy_with_logits, kl_div

# classification losses
from .ops.classification_loss import cross_entropy, nll_loss

# pointwise losses: likelihoods (poisson, gaussian) and margins (ranking, hinge, soft margin)
from .ops.pointwise_loss import (
    gaussian_nll_loss,
    hinge_embedding_loss,
    margin_ranking_loss,
    poisson_nll_loss,
    soft_margin_loss,
)

# multi-class and multi-label losses
from .ops.multiclass_loss import multi_margin_loss, multilabel_margin_loss, multilabel_soft_margin_loss

# convolution
from .ops.conv import conv1d, conv2d, conv3d

# transposed convolution
from .ops.conv_transpose import conv_transpose1d, conv_transpose2d, conv_transpose3d

# pooling
from .ops.pooling import (
    adaptive_avg_pool1d,
    adaptive_avg_pool2d,
    adaptive_avg_pool3d,
    adaptive_max_pool1d,
    adaptive_max_pool2d,
    adaptive_max_pool3d,
    avg_pool1d,
    avg_pool2d,
    avg_pool3d,
    max_pool1d,
    max_pool2d,
    max_pool3d,
)

# more pooling: lp, max unpooling, fractional max
from .ops.pooling_more import (
    fractional_max_pool2d,
    fractional_max_pool3d,
    lp_pool1d,
    lp_pool2d,
    lp_pool3d,
    max_unpool1d,
    max_unpool2d,
    max_unpool3d,
)

# padding
from .ops.padding import pad

# rearrangements: pixel and channel shuffles, fold / unfold
from .ops.shuffle import channel_shuffle, fold, pixel_shuffle, pixel_unshuffle, unfold

# resampling
from .ops.grid_sample import affine_grid, grid_sample
from .ops.resample import interpolate

# normalization
from .ops.normalization import batch_norm, group_norm, layer_norm, rms_norm

# instance norm
from .ops.instance_norm import instance_norm

# local response norm
from .ops.lrn import local_response_norm

# embedding and attention
from .ops.attention import scaled_dot_product_attention
from .ops.embedding import embedding
from .ops.multi_head_attention import multi_head_attention_forward

# embedding bags (sum / mean / max of rows)
from .ops.embedding_bag import embedding_bag

# weight normalization (torch._weight_norm, behind torch.nn.utils.parametrizations.weight_norm)
from .ops.weight_norm import weight_norm

# tensor-level products (torch.matmul, mm, bmm, addmm, baddbmm)
from .ops.matmul import addmm, baddbmm, bmm, matmul, mm

# metric-learning losses (on the distances)
from .ops.loss_metric import cosine_embedding_loss, triplet_margin_loss, triplet_margin_with_distance_loss

# connectionist temporal classification
from .ops.ctc import ctc_loss

# fused linear + cross-entropy
from .ops.linear_cross_entropy import linear_cross_entropy

# functional leftovers: in-place activations, deprecated upsample aliases, the *_with_indices
# poolings, gumbel_softmax, native_channel_shuffle, conv_tbc
from .ops.activation import elu_, leaky_relu_, relu_
from .ops.conv import conv_tbc
from .ops.pooling import (
    adaptive_max_pool1d_with_indices,
    adaptive_max_pool2d_with_indices,
    adaptive_max_pool3d_with_indices,
    max_pool1d_with_indices,
    max_pool2d_with_indices,
    max_pool3d_with_indices,
)
from .ops.pooling_more import fractional_max_pool2d_with_indices, fractional_max_pool3d_with_indices
from .ops.resample import upsample, upsample_bilinear, upsample_nearest
from .ops.shuffle import native_channel_shuffle
from .ops.softmax import gumbel_softmax
# end of functional leftovers

__all__ = [name for name in dir() if not name.startswith("_")]
