# minimind.c: `make` builds ./run; `make run` builds it and generates from the demo model;
# `make test` runs the test suite (normal and ASan/UBSan builds); `make bench` prints speeds.
CC      ?= gcc
CFLAGS  ?= -O3 -march=native
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
	$(CC) $(WARN) $(CFLAGS) $(OMP) -o run run.c -lm
	@touch $@

# the demo: a small minimind-3 trained on Tang poems (demo/train.py), generating from a prompt
run: .run-built
	./run demo/model.bin -i "春眠不覺曉，" -n 48 -s 42

# the same program with AddressSanitizer and UndefinedBehaviorSanitizer
run-asan: run.c tokenizer.c model.h
	$(CC) $(WARN) $(SANITIZE) $(OMP) -o $@ run.c -lm

# the tokenizer test driver (tests/tokenizer_test.c includes tokenizer.c)
tests/tokenizer_test: tests/tokenizer_test.c tokenizer.c model.h
	$(CC) $(WARN) $(CFLAGS) -o $@ tests/tokenizer_test.c

tests/tokenizer_test-asan: tests/tokenizer_test.c tokenizer.c model.h
	$(CC) $(WARN) $(SANITIZE) -o $@ tests/tokenizer_test.c

test: .run-built run-asan tests/tokenizer_test tests/tokenizer_test-asan
	$(PYTHON) tests/run_tests.py ./run:tests/tokenizer_test ./run-asan:tests/tokenizer_test-asan

# speed figures (never timed tests): tokenizer encoding MB/s on 16 MB of mixed text, with
# MiniMind's real tokenizers when ../shared/minimind is there, else the project's fixture one
bench: .run-built tests/tokenizer_test
	@mkdir -p tests/tmp
	@for tok in ../shared/minimind/minimind2 ../shared/minimind/minimind-3 tests/fixtures/tokenizer; do \
	  [ -d $$tok ] || continue; \
	  $(PYTHON) export.py tests/fixtures/vocab6400.pth tests/tmp/bench_tok.bin --tokenizer $$tok >/dev/null; \
	  printf 'tokenizer encode, %s: ' $$tok; tests/tokenizer_test tests/tmp/bench_tok.bin speed 16; \
	done

# regenerate tests/fixtures (needs PyTorch: apt-get install python3-torch)
fixtures:
	/usr/bin/python3 tests/gen_fixtures.py

clean:
	rm -f run .run-built run-asan tests/tokenizer_test tests/tokenizer_test-asan
