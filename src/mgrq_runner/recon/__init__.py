"""Block-wise reconstruction (OBWR) with QDrop, global (EBGS) and local (IBLS) supervision, fused losses."""
