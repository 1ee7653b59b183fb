module fuyao.local/bench/nullextender

go 1.22
