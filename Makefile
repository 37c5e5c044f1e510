# minimind.c: `make` builds ./run; `make run` builds it and generates from the demo model;
# `make test` runs the test suite (normal and ASan/UBSan builds); `make bench` prints speeds,
# `make bench-busy` speeds beside busy processes and `make bench-wall` decoding against the memory
# wall; `make fuzz` builds the libFuzzer targets of tests/fuzz/ and runs each FUZZ_SECONDS.
CC      ?= gcc
ARCH    ?= -march=native   # the fast kernels this machine can run (make ARCH=: none, run.c's plain loops)
CFLAGS  ?= -O3
WARN     = -std=c11 -Wall -Wextra -fopenmp-simd
OMP     ?= -fopenmp
SANITIZE = -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
WERROR  ?= -Werror   # the test builds: a warning fails make test (WERROR= lets a new compiler's pass)
PYTHON  ?= python3
ifeq ($(strip $(OMP)),)
WARN    += -Wno-unknown-pragmas   # built without OpenMP (make OMP=): its pragmas are ignored
endif

.PHONY: all run test bench bench-busy bench-wall fixtures fuzz fuzz-build fuzz-corpus clean FORCE

# the sources of ./run: run.c includes the rest (one translation unit)
SRC   = run.c tokenizer.c model.h kernels.h kernels/vector.h kernels/matmul.c kernels/attention.c
# ./run --version names the commit it was built from
VERSION := $(shell git describe --always --dirty 2>/dev/null || echo unknown)
BUILD = $(CC) $(WARN) $(CFLAGS) $(ARCH) $(OMP) -DMINIMIND_VERSION='"$(VERSION)"'

all: .run-built quantize

# export.py's converter (quantize.c): f16 to q8_0 and the like, in C. Rounding is export.py's
# own, so no fused multiply-adds
quantize: quantize.c model.h
	$(CC) $(WARN) $(CFLAGS) -ffp-contract=off -o $@ quantize.c -lm

quantize-asan: quantize.c model.h
	$(CC) $(WARN) $(WERROR) $(SANITIZE) -ffp-contract=off -o $@ quantize.c -lm

# The program ./run. Its target is a stamp, so that `make run` can mean "build and run the demo";
# it is rebuilt when ./run is missing, a source changed, or the compiler or its flags changed
# (.run-flags holds the last command, rewritten only when it differs).
.run-built: $(SRC) .run-flags $(if $(wildcard run),,FORCE)
	$(BUILD) -o run run.c -lm
	@touch $@

.run-flags: FORCE
	@echo '$(BUILD)' | cmp -s - $@ || echo '$(BUILD)' >$@

# the demo: a small minimind-3 trained on Tang poems (demo/train.py), generating from a prompt
run: .run-built
	./run demo/model.bin -i "春眠不覺曉，" -n 48 -s 42

# the same program with AddressSanitizer and UndefinedBehaviorSanitizer (fast kernels included)
run-asan: $(SRC)
	$(CC) $(WARN) $(WERROR) $(SANITIZE) $(ARCH) $(OMP) -o $@ run.c -lm

# the portable build: no fast kernels, run.c's plain loops (what a machine without AVX2 or NEON runs)
run-portable: $(SRC)
	$(CC) $(WARN) $(WERROR) -O2 $(OMP) -o $@ run.c -lm

# without OpenMP (make OMP=, or a compiler without it, as Apple's clang): one thread
run-noomp: $(SRC)
	$(CC) $(WARN) -Wno-unknown-pragmas $(WERROR) -O2 $(ARCH) -o $@ run.c -lm

# the AVX2 kernels, which machines without AVX-512 run: built and tested here too (x86-64 only);
# and the same with AVX-VNNI (Alder Lake and later, Zen 5), whose q8_0 tiles use vpdpbusd, tested
# where the processor has it
AVX2 = -mavx2 -mfma -mf16c
AVXVNNI = $(AVX2) -mavxvnni
run-avx2: $(SRC)
	$(CC) $(WARN) $(WERROR) -O2 $(AVX2) $(OMP) -o $@ run.c -lm

run-avxvnni: $(SRC)
	$(CC) $(WARN) $(WERROR) -O2 $(AVXVNNI) $(OMP) -o $@ run.c -lm

# The NEON kernels (aarch64), built by a cross compiler and run under qemu-user where both are
# here (Debian: apt-get install gcc-aarch64-linux-gnu qemu-user; .ci/run installs them when
# missing), else make test skips them. run-neon and tests/kernel_test-neon* are scripts that run
# the aarch64 programs beside them (*.aarch64) under qemu-aarch64. The -neon builds are ARMv8.2
# with the dot product (sdot); tests/kernel_test-neon-v8 is ARMv8.0 (its q8_0 tiles use smull).
NEON_CC    ?= aarch64-linux-gnu-gcc
NEON_QEMU  ?= qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu max
NEON_WORKS  = command -v $(NEON_CC) >/dev/null 2>&1 && command -v $(firstword $(NEON_QEMU)) >/dev/null 2>&1
NEON_BUILD  = $(NEON_CC) $(WARN) $(WERROR) $(CFLAGS) $(OMP)
NEON_BINARIES = run-neon tests/kernel_test-neon tests/kernel_test-neon-v8

run-neon.aarch64: $(SRC)
	$(NEON_BUILD) -march=armv8.2-a+dotprod -o $@ run.c -lm

tests/kernel_test-neon.aarch64: tests/kernel_test.c $(SRC)
	$(NEON_BUILD) -Wno-unused-function -march=armv8.2-a+dotprod -o $@ tests/kernel_test.c -lm

tests/kernel_test-neon-v8.aarch64: tests/kernel_test.c $(SRC)
	$(NEON_BUILD) -Wno-unused-function -march=armv8-a -o $@ tests/kernel_test.c -lm

$(NEON_BINARIES): %: %.aarch64
	printf '#!/bin/sh\nexec $(NEON_QEMU) "$$0.aarch64" "$$@"\n' >$@ && chmod +x $@

# the kernel test driver (tests/kernel_test.c includes run.c): the fast kernels vs run.c's plain loops
KERNEL_TEST = $(CC) $(WARN) $(WERROR) -Wno-unused-function
tests/kernel_test: tests/kernel_test.c $(SRC)
	$(KERNEL_TEST) $(CFLAGS) $(ARCH) $(OMP) -o $@ tests/kernel_test.c -lm

tests/kernel_test-asan: tests/kernel_test.c $(SRC)
	$(KERNEL_TEST) $(SANITIZE) $(ARCH) $(OMP) -o $@ tests/kernel_test.c -lm

tests/kernel_test-avx2: tests/kernel_test.c $(SRC)
	$(KERNEL_TEST) -O2 $(AVX2) $(OMP) -o $@ tests/kernel_test.c -lm

tests/kernel_test-avxvnni: tests/kernel_test.c $(SRC)
	$(KERNEL_TEST) -O2 $(AVXVNNI) $(OMP) -o $@ tests/kernel_test.c -lm

# the memory ceiling of decoding: how fast a mapped model file reads, for make bench; and decoding
# token by token beside it (tests/stream.c includes run.c)
tests/stream: tests/stream.c $(SRC)
	$(CC) $(WARN) $(WERROR) -Wno-unused-function $(CFLAGS) $(ARCH) $(OMP) -o $@ tests/stream.c -lm

# the tokenizer test driver (tests/tokenizer_test.c includes tokenizer.c)
tests/tokenizer_test: tests/tokenizer_test.c tokenizer.c model.h
	$(CC) $(WARN) $(WERROR) $(CFLAGS) $(ARCH) -o $@ tests/tokenizer_test.c

tests/tokenizer_test-asan: tests/tokenizer_test.c tokenizer.c model.h
	$(CC) $(WARN) $(WERROR) $(SANITIZE) -o $@ tests/tokenizer_test.c

# The fuzz targets (docs/testing.md, "Fuzzing"): clang's libFuzzer with AddressSanitizer and UBSan.
# Debian: apt-get install clang libclang-rt-14-dev (the runtime of this clang's version).
FUZZ_CC      ?= clang
FUZZ_FLAGS    = -std=c11 -Wall -Wextra -Wno-unused-function -Wno-unknown-pragmas -Wno-pass-failed $(WERROR) \
                -fopenmp-simd -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
FUZZ_TARGETS  = loader tokenizer chat args
FUZZ_BINARIES = $(FUZZ_TARGETS:%=tests/fuzz/%_fuzz)
FUZZ_SECONDS ?= 10
# does $(FUZZ_CC) link a libFuzzer target here? (make test skips the fuzz smoke runs when not)
FUZZ_WORKS    = printf 'int LLVMFuzzerTestOneInput(const char *d, long n) { return 0; }' | \
                $(FUZZ_CC) -fsanitize=fuzzer -x c - -o /dev/null >/dev/null 2>&1

tests/fuzz/%_fuzz: tests/fuzz/%_fuzz.c tests/fuzz/fuzz.h $(SRC)
	$(FUZZ_CC) $(FUZZ_FLAGS) $(ARCH) -o $@ $< -lm

fuzz-build: $(FUZZ_BINARIES)

# each target FUZZ_SECONDS on its committed corpus (new inputs go to tests/tmp/fuzz/, crashes
# to tests/tmp/fuzz/TARGET-crash-*); the last lines of each are its executions and coverage.
# FUZZ_TARGETS=loader runs one; FUZZ_ARGS passes libFuzzer flags (e.g. -timeout=300 on a busy machine)
fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p tests/tmp/fuzz/$$t; \
	  echo "== $$t: $(FUZZ_SECONDS) s (log: tests/tmp/fuzz/$$t.log)"; \
	  tests/fuzz/$${t}_fuzz -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 \
	    -dict=tests/fuzz/$$t.dict -artifact_prefix=tests/tmp/fuzz/$$t- $(FUZZ_ARGS) \
	    tests/tmp/fuzz/$$t tests/fuzz/corpus/$$t >tests/tmp/fuzz/$$t.log 2>&1; rc=$$?; \
	  grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^Done|ERROR|SUMMARY|^fuzz:' tests/tmp/fuzz/$$t.log; \
	  [ $$rc = 0 ] || { echo "$$t: failed (exit $$rc), see tests/tmp/fuzz/$$t.log"; exit 1; }; \
	done

# regenerate the seed corpora (tests/fuzz/gen_corpus.py: from the fixtures, through export.py)
fuzz-corpus:
	$(PYTHON) tests/fuzz/gen_corpus.py

TEST_BINARIES = .run-built run-asan run-portable run-noomp tests/tokenizer_test tests/tokenizer_test-asan \
                tests/kernel_test tests/kernel_test-asan tests/stream quantize quantize-asan
TEST_SPECS = ./run:tests/tokenizer_test:tests/kernel_test ./run-asan:tests/tokenizer_test-asan:tests/kernel_test-asan \
             ./run-portable ./run-noomp
ifeq ($(shell uname -m),x86_64)
TEST_BINARIES += run-avx2 tests/kernel_test-avx2
TEST_SPECS += ./run-avx2::tests/kernel_test-avx2
ifneq ($(shell $(CC) -mavxvnni -E -x c /dev/null >/dev/null 2>&1 && grep -qw avx_vnni /proc/cpuinfo 2>/dev/null && echo yes),)
TEST_BINARIES += run-avxvnni tests/kernel_test-avxvnni
TEST_SPECS += ./run-avxvnni::tests/kernel_test-avxvnni
endif
# (on an aarch64 machine ./run itself is the NEON build; ?: skipped when not built)
NEON_SPECS = '?./run-neon::tests/kernel_test-neon' '?::tests/kernel_test-neon-v8'
endif
FUZZ_SMOKE_SECONDS ?= 3
test:  # the builds in parallel (about 25 s on two cores), the fuzz targets when clang can, the NEON
       # builds when a cross compiler and qemu are here, then the suite
	@$(MAKE) --no-print-directory -j2 $(TEST_BINARIES)
	@if $(FUZZ_WORKS); then $(MAKE) --no-print-directory -j2 $(FUZZ_BINARIES); \
	 else rm -f $(FUZZ_BINARIES); echo "no libFuzzer ($(FUZZ_CC) -fsanitize=fuzzer): the fuzz smoke runs will be skipped"; fi
	@if [ -z "$(NEON_SPECS)" ]; then :; elif $(NEON_WORKS); then $(MAKE) --no-print-directory -j2 $(NEON_BINARIES); \
	 else rm -f $(NEON_BINARIES); echo "no $(NEON_CC) or $(firstword $(NEON_QEMU)): the NEON tests will be skipped"; fi
	FUZZ_SECONDS=$(FUZZ_SMOKE_SECONDS) $(PYTHON) tests/run_tests.py $(TEST_SPECS) $(NEON_SPECS)

# speed figures (never timed tests). The engine: random-weight models of the three MiniMind shapes
# through export.py, every dtype, threads 1 and 2, medians of BENCH_RUNS runs (tests/bench.py;
# BENCH_ARGS passes more, e.g. BENCH_ARGS="--shapes m2small --dtypes q8_0 -- --kv f16").
# The tokenizer: encoding MB/s on 16 MB of mixed text, with MiniMind's real tokenizers when
# ../shared/minimind is there, else the project's fixture one.
BENCH_RUNS ?= 3
bench: .run-built quantize tests/tokenizer_test tests/stream
	@mkdir -p tests/tmp
	$(PYTHON) tests/bench.py --runs $(BENCH_RUNS) $(BENCH_ARGS)
	$(PYTHON) tests/bench.py --export --runs $(BENCH_RUNS)
	@for tok in ../shared/minimind/minimind2 ../shared/minimind/minimind-3 tests/fixtures/tokenizer; do \
	  [ -d $$tok ] || continue; \
	  $(PYTHON) export.py tests/fixtures/vocab6400.pth tests/tmp/bench_tok.bin --tokenizer $$tok >/dev/null; \
	  printf 'tokenizer encode, %s: ' $$tok; tests/tokenizer_test tests/tmp/bench_tok.bin speed 16; \
	done

# the default thread count beside 0, 1 and 2 busy processes against --threads 1, alternated, and
# make run's first token and peak RSS at the default context against -c 64 (tests/bench.py --busy)
BUSY_RUNS ?= 5
bench-busy: .run-built
	$(PYTHON) tests/bench.py --busy --runs $(BUSY_RUNS) $(BENCH_ARGS)

# decoding alone against the memory wall: each run between two of tests/stream's, at each width the
# build reads weight rows in (--row-bits), the f32/f16/bf16 cells of the larger shapes (tests/bench.py --wall)
WALL_RUNS ?= 7
WALL_ARGS ?= --shapes m3,m2 --dtypes f32,f16,bf16
bench-wall: .run-built tests/stream
	$(PYTHON) tests/bench.py --wall --runs $(WALL_RUNS) $(WALL_ARGS)

# regenerate tests/fixtures (needs PyTorch: apt-get install python3-torch)
fixtures:
	/usr/bin/python3 tests/gen_fixtures.py

clean:
	rm -f run .run-built .run-flags run-asan run-portable run-noomp run-avx2 run-avxvnni tests/kernel_test-avxvnni tests/tokenizer_test tests/tokenizer_test-asan \
	    tests/kernel_test tests/kernel_test-asan tests/kernel_test-avx2 tests/stream $(FUZZ_BINARIES) \
	    $(NEON_BINARIES) $(NEON_BINARIES:%=%.aarch64)
