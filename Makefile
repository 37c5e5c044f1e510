# minimind.c: `make` builds ./run, `make test` runs the test suite (normal and ASan/UBSan builds).
CC      ?= gcc
CFLAGS  ?= -O3 -march=native
WARN     = -std=c11 -Wall -Wextra -fopenmp-simd
OMP     ?= -fopenmp
SANITIZE = -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
PYTHON  ?= python3
ifeq ($(strip $(OMP)),)
WARN    += -Wno-unknown-pragmas   # built without OpenMP (make OMP=): its pragmas are ignored
endif

.PHONY: all test fixtures clean

all: run

run: run.c model.h
	$(CC) $(WARN) $(CFLAGS) $(OMP) -o $@ run.c -lm

# the same program with AddressSanitizer and UndefinedBehaviorSanitizer
run-asan: run.c model.h
	$(CC) $(WARN) $(SANITIZE) $(OMP) -o $@ run.c -lm

test: run run-asan
	$(PYTHON) tests/run_tests.py ./run ./run-asan

# regenerate tests/fixtures (needs PyTorch: apt-get install python3-torch)
fixtures:
	/usr/bin/python3 tests/gen_fixtures.py

clean:
	rm -f run run-asan
