"""Split a model into a context graph (what depends only on the image side) and a query graph,
so that many queries about one image pay for the image once. See ``graph`` for the cut and
``model_dir`` for ``qcexport convert --split context``."""

from qcexport.split.graph import Boundary, SplitGraphs, classify, split_graph

__all__ = ["Boundary", "SplitGraphs", "classify", "split_graph"]
