"""Document filters: datatrove's Gopher, C4 and FineWeb quality rules (`quality`) and its
URL block lists (`url`), re-implemented to give the same decisions, faster."""
