"""Token trees through recurrent, state-space, convolution and linear-attention layers (STree-style).

`levels` orders a step's tree slots by depth and walks them; `seams` replaces the order-dependent
functions transformers factors out of these mixers while a tree is verified; `states` keeps each
cache row's conv and recurrent states, and every tree node's during a verify forward.
"""
