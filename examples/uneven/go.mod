module example.com/uneven

go 1.19
