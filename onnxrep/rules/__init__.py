"""The rules, in the order the engine tries them. No import-time registry: this list is it.

Order matters only for which exact rewrite happens first; every rule is exact on its own.
BN folds backwards into its producer before it folds forwards into a consumer.
"""

from onnxrep.rule import Rule
from onnxrep.rules.depthwise_multiplier import WidenIntoDepthwise
from onnxrep.rules.flatten import ReshapeToFlatten
from onnxrep.rules.fold_affine import FoldChannelAffineIntoConv
from onnxrep.rules.fold_bn import FoldBatchNormIntoProducer
from onnxrep.rules.fold_bn_forward import FoldBatchNormIntoNextConv
from onnxrep.rules.global_pool import ReduceMeanToGlobalPool
from onnxrep.rules.matmul_weight_layout import TransposedMatMulWeight
from onnxrep.rules.merge_concat import MergeConcatenatedConvs
from onnxrep.rules.merge_parallel import MergeParallelBranches
from onnxrep.rules.merge_sequential import MergeSequentialConvs
from onnxrep.rules.propagate_affine import PropagateAffine
from onnxrep.rules.remove_residual import RemoveResidual
from onnxrep.rules.reshape_chain import CollapseReshapes
from onnxrep.rules.rm_merge_pointwise import MergePointwisePair
from onnxrep.rules.split_sequence import SequenceToSplit

RULES: list[Rule] = [
    FoldBatchNormIntoProducer(),
    FoldChannelAffineIntoConv(),
    FoldBatchNormIntoNextConv(),
    MergeSequentialConvs(),
    MergeParallelBranches(),
    MergeConcatenatedConvs(),
    PropagateAffine(),
    # canonical plain ops (docs/RULES.md, global-pool and flatten): after the merges
    ReduceMeanToGlobalPool(),
    ReshapeToFlatten(),
    CollapseReshapes(),
    SequenceToSplit(),
    # a depthwise multiplier left by residual removal (or exported so): a depthwise Conv
    WidenIntoDepthwise(),
    # opt-in (--remove-residuals), after every merging rule:
    RemoveResidual(),
    MergePointwisePair(),
]

# Run after RULES for `--target T` only: layouts one runtime's converter prefers and the
# others would fold back (docs/DESIGN.md, "Targets").
TARGET_RULES: dict[str, list[Rule]] = {
    "openvino": [TransposedMatMulWeight()],
}

__all__ = ["RULES", "TARGET_RULES"]
