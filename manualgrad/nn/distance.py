"""Distance modules: the torch classes with forward routed to manualgrad.functional."""
import torch

from .. import functional as F


class CosineSimilarity(torch.nn.CosineSimilarity):
    def forward(self, x1, x2):
        return F.cosine_similarity(x1, x2, self.dim, self.eps)


class PairwiseDistance(torch.nn.PairwiseDistance):
    def forward(self, x1, x2):
        return F.pairwise_distance(x1, x2, self.norm, self.eps, self.keepdim)
