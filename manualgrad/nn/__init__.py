"""manualgrad.nn: torch.nn names. Each class subclasses its torch twin and overrides only
``forward`` (calling manualgrad.functional), so constructor, parameters, buffers,
``state_dict``, ``repr``, ``reset_parameters`` and ``isinstance`` are torch's own."""
from .activation import ELU, GELU, GLU, Hardswish, LeakyReLU, LogSoftmax, Mish, ReLU, Sigmoid, SiLU, Softmax, Softplus, Tanh
from .activation_more import CELU, SELU, Hardshrink, Hardsigmoid, Hardtanh, LogSigmoid, PReLU, ReLU6, RReLU, Softmax2d, Softmin, Softshrink, Softsign, Tanhshrink, Threshold
from .distance import CosineSimilarity, PairwiseDistance
from .dropout import Dropout
from .dropout_more import AlphaDropout, Dropout1d, Dropout2d, Dropout3d, FeatureAlphaDropout
from .linear import Linear
from .bilinear import Bilinear
from .loss import (
    BCELoss,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    HuberLoss,
    KLDivLoss,
    L1Loss,
    MSELoss,
    NLLLoss,
    SmoothL1Loss,
)
# more losses
from .loss_more import (
    GaussianNLLLoss,
    HingeEmbeddingLoss,
    MarginRankingLoss,
    MultiLabelMarginLoss,
    MultiLabelSoftMarginLoss,
    MultiMarginLoss,
    NLLLoss2d,
    PoissonNLLLoss,
    SoftMarginLoss,
)

# convolution
from .conv import Conv1d, Conv2d, Conv3d

# transposed convolution
from .conv_transpose import ConvTranspose1d, ConvTranspose2d, ConvTranspose3d

# pooling
from .pooling import (
    AdaptiveAvgPool1d,
    AdaptiveAvgPool2d,
    AdaptiveMaxPool2d,
    AvgPool1d,
    AvgPool2d,
    Flatten,
    MaxPool1d,
    MaxPool2d,
    MaxPool3d,
    Unflatten,
)

# more pooling
from .pooling_more import (
    AdaptiveAvgPool3d,
    AdaptiveMaxPool1d,
    AdaptiveMaxPool3d,
    AvgPool3d,
    FractionalMaxPool2d,
    FractionalMaxPool3d,
    LPPool1d,
    LPPool2d,
    LPPool3d,
    MaxUnpool1d,
    MaxUnpool2d,
    MaxUnpool3d,
)

# padding
from .padding import (
    CircularPad1d,
    CircularPad2d,
    CircularPad3d,
    ConstantPad1d,
    ConstantPad2d,
    ConstantPad3d,
    ReflectionPad1d,
    ReflectionPad2d,
    ReflectionPad3d,
    ReplicationPad1d,
    ReplicationPad2d,
    ReplicationPad3d,
    ZeroPad1d,
    ZeroPad2d,
    ZeroPad3d,
)

# resampling
from .resample import Upsample, UpsamplingBilinear2d, UpsamplingNearest2d

# rearrangements
from .shuffle import ChannelShuffle, Fold, PixelShuffle, PixelUnshuffle, Unfold

# normalization
from .normalization import BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, LayerNorm, RMSNorm

# instance norm
from .instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d

# sync batch norm
from .sync_batchnorm import SyncBatchNorm

# local response norm
from .lrn import CrossMapLRN2d, LocalResponseNorm

# lazy modules
from .lazy import (
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    LazyConv1d,
    LazyConv2d,
    LazyConv3d,
    LazyConvTranspose1d,
    LazyConvTranspose2d,
    LazyConvTranspose3d,
    LazyInstanceNorm1d,
    LazyInstanceNorm2d,
    LazyInstanceNorm3d,
    LazyLinear,
)

# embedding and attention
from .attention import MultiheadAttention
from .embedding import Embedding

# metric-learning losses
from .loss_metric import CosineEmbeddingLoss, TripletMarginLoss, TripletMarginWithDistanceLoss

# connectionist temporal classification
from .ctc import CTCLoss

# transformer layers
from .transformer import Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer

# embedding bags
from .embedding_bag import EmbeddingBag

# parametrizations (torch.nn.utils.parametrizations' modules: not torch.nn names, so not in
# __all__), swapped by convert like the layers
from . import weight_norm as _weight_norm

PARAMETRIZATIONS = (_weight_norm.WeightNorm,)
FORWARD_PRE_HOOKS = (_weight_norm.LegacyWeightNorm,)  # objects convert swaps among a module's pre-hooks

# fused linear + cross-entropy
from .linear_cross_entropy import LinearCrossEntropyLoss

# recurrent layers and cells
from .recurrent import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

# adaptive softmax
from .adaptive import AdaptiveLogSoftmaxWithLoss

# The module classes only (dir() would also list the submodules: activation, loss, ...).
__all__ = [name for name, value in list(globals().items()) if isinstance(value, type)]
