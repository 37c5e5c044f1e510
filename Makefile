# minimind.c: `make` builds ./run; `make run` builds it and generates from the demo model;
# `make test` runs the test suite (normal and ASan/UBSan builds); `make bench` prints speeds.
CC      ?= gcc
ARCH    ?= -march=native   # the SIMD kernels this machine has (make ARCH= for a portable build)
CFLAGS  ?= -O3
WARN     = -std=c11 -Wall -Wextra -fopenmp-simd
OMP     ?= -fopenmp
SANITIZE = -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
PYTHON  ?= python3
ifeq ($(strip $(OMP)),)
WARN    += -Wno-unknown-pragmas   # built without OpenMP (make OMP=): its pragmas are ignored
endif

.PHONY: all run test bench fixtures clean

all: .run-built

# the program ./run (its target is a stamp, so that `make run` can mean "build and run the demo")
.run-built: run.c tokenizer.c model.h
	$(CC) $(WARN) $(CFLAGS) $(ARCH) $(OMP) -o run run.c -lm
	@touch $@

# the demo: a small minimind-3 trained on Tang poems (demo/train.py), generating from a prompt
run: .run-built
	./run demo/model.bin -i "春眠不覺曉，" -n 48 -s 42

# the same program with AddressSanitizer and UndefinedBehaviorSanitizer (SIMD kernels included)
run-asan: run.c tokenizer.c model.h
	$(CC) $(WARN) $(SANITIZE) $(ARCH) $(OMP) -o $@ run.c -lm

# the portable build: no SIMD kernels (what a machine without AVX2 runs), tested numerically
run-portable: run.c tokenizer.c model.h
	$(CC) $(WARN) -O2 $(OMP) -o $@ run.c -lm

# the AVX2 kernels, which machines without AVX-512 run: built and tested here too (x86-64 only)
AVX2 = -mavx2 -mfma -mf16c
run-avx2: run.c tokenizer.c model.h
	$(CC) $(WARN) -O2 $(AVX2) $(OMP) -o $@ run.c -lm

# the kernel test driver (tests/kernel_test.c includes run.c): fast kernels vs references
KERNEL_TEST = $(CC) $(WARN) -Wno-unused-function
tests/kernel_test: tests/kernel_test.c run.c tokenizer.c model.h
	$(KERNEL_TEST) $(CFLAGS) $(ARCH) $(OMP) -o $@ tests/kernel_test.c -lm

tests/kernel_test-asan: tests/kernel_test.c run.c tokenizer.c model.h
	$(KERNEL_TEST) $(SANITIZE) $(ARCH) $(OMP) -o $@ tests/kernel_test.c -lm

tests/kernel_test-avx2: tests/kernel_test.c run.c tokenizer.c model.h
	$(KERNEL_TEST) -O2 $(AVX2) $(OMP) -o $@ tests/kernel_test.c -lm

# the tokenizer test driver (tests/tokenizer_test.c includes tokenizer.c)
tests/tokenizer_test: tests/tokenizer_test.c tokenizer.c model.h
	$(CC) $(WARN) $(CFLAGS) $(ARCH) -o $@ tests/tokenizer_test.c

tests/tokenizer_test-asan: tests/tokenizer_test.c tokenizer.c model.h
	$(CC) $(WARN) $(SANITIZE) -o $@ tests/tokenizer_test.c

TEST_BINARIES = .run-built run-asan run-portable tests/tokenizer_test tests/tokenizer_test-asan \
                tests/kernel_test tests/kernel_test-asan
TEST_SPECS = ./run:tests/tokenizer_test:tests/kernel_test ./run-asan:tests/tokenizer_test-asan:tests/kernel_test-asan \
             ./run-portable
ifeq ($(shell uname -m),x86_64)
TEST_BINARIES += run-avx2 tests/kernel_test-avx2
TEST_SPECS += ./run-avx2::tests/kernel_test-avx2
endif
test:  # the builds in parallel (about 25 s on two cores), then the suite
	@$(MAKE) --no-print-directory -j2 $(TEST_BINARIES)
	$(PYTHON) tests/run_tests.py $(TEST_SPECS)

# speed figures (never timed tests). The engine: random-weight models of the three MiniMind shapes
# through export.py, every dtype, threads 1 and 2, medians of BENCH_RUNS runs (tests/bench.py;
# BENCH_ARGS passes more, e.g. BENCH_ARGS="--shapes m2small --dtypes q8_0 -- --kv f16").
# The tokenizer: encoding MB/s on 16 MB of mixed text, with MiniMind's real tokenizers when
# ../shared/minimind is there, else the project's fixture one.
BENCH_RUNS ?= 3
bench: .run-built tests/tokenizer_test
	@mkdir -p tests/tmp
	$(PYTHON) tests/bench.py --runs $(BENCH_RUNS) $(BENCH_ARGS)
	@for tok in ../shared/minimind/minimind2 ../shared/minimind/minimind-3 tests/fixtures/tokenizer; do \
	  [ -d $$tok ] || continue; \
	  $(PYTHON) export.py tests/fixtures/vocab6400.pth tests/tmp/bench_tok.bin --tokenizer $$tok >/dev/null; \
	  printf 'tokenizer encode, %s: ' $$tok; tests/tokenizer_test tests/tmp/bench_tok.bin speed 16; \
	done

# regenerate tests/fixtures (needs PyTorch: apt-get install python3-torch)
fixtures:
	/usr/bin/python3 tests/gen_fixtures.py

clean:
	rm -f run .run-built run-asan run-portable run-avx2 tests/tokenizer_test tests/tokenizer_test-asan \
	    tests/kernel_test tests/kernel_test-asan tests/kernel_test-avx2
