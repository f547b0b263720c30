# zimage.c: `make` builds ./sample and ./train; `make test` runs the test suite.
#   make PORTABLE=1   generic binary (no -march=native)
#   make OMP=1        OpenMP instead of the pthread pool
#   make CC=clang     any C11 compiler
#   make debug        ASan + UBSan build in build/debug/
#   make test-asan    the test suite under ASan + UBSan + LeakSanitizer (build/asan/)
#   make fuzz         libFuzzer targets of fuzz/ (clang), FUZZ_SECONDS (60) each; see fuzz/README.md
#   make bench        kernel benchmarks
#   make bench-full   whole-model timings on a full-size random model (~20 GB, written once
#                     to $(ZIMAGE_BENCH_MODEL), default ~/.cache/zimage-bench/model)
# BUILD (objects) and BINDIR (programs) may be overridden to keep several builds apart.
CC      ?= cc
BUILD   ?= build
BINDIR  ?= .
OPT     ?= -O3
ARCH    := -march=native
ifeq ($(PORTABLE),1)
ARCH    :=
endif
CFLAGS  += -std=c11 -D_GNU_SOURCE -Wall -Wextra $(OPT) $(ARCH) -ffp-contract=fast -MMD -MP
LDLIBS  += -lm -lpthread
ifeq ($(OMP),1)
CFLAGS  += -fopenmp -DZI_OMP
LDFLAGS += -fopenmp
endif

PROGS   := sample train
LIBSRC  := $(filter-out $(PROGS:=.c),$(wildcard *.c))
LIBOBJ  := $(LIBSRC:%.c=$(BUILD)/%.o)
# fuzz/*.c: the fuzz targets; the test runner replays their corpora (test/test_fuzz.c)
TESTSRC := $(wildcard test/*.c) $(wildcard fuzz/*.c)
TESTOBJ := $(TESTSRC:%.c=$(BUILD)/%.o)
BENCHSRC:= $(wildcard bench/*.c)
ZIMAGE_BENCH_MODEL ?= $(HOME)/.cache/zimage-bench/model

all: $(PROGS:%=$(BINDIR)/%)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libzimage.a: $(LIBOBJ)
	rm -f $@ && ar rcs $@ $^

$(PROGS:%=$(BINDIR)/%): $(BINDIR)/%: $(BUILD)/%.o $(BUILD)/libzimage.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/zitest: $(TESTOBJ) $(BUILD)/libzimage.a
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

# The runner's last line is "N passed, N failed". TEST=substring runs a subset. The bench
# programs are built too (not run), so that they cannot rot unnoticed.
test: all $(BUILD)/zitest $(BUILD)/zibench $(BUILD)/bench_full $(BUILD)/make_model
	ZI_BIN=$(BINDIR) $(BUILD)/zitest $(TEST)

# bench programs: bench/NAME.c (+ bench/machine.c, the machine's peak and bandwidth)
$(BUILD)/zibench: $(BUILD)/bench/bench.o $(BUILD)/bench/machine.o $(BUILD)/libzimage.a
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)
$(BUILD)/bench_full: $(BUILD)/bench/bench_full.o $(BUILD)/bench/machine.o $(BUILD)/libzimage.a
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)
$(BUILD)/make_model: $(BUILD)/bench/make_model.o $(BUILD)/libzimage.a
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

bench: $(BUILD)/zibench
	$(BUILD)/zibench $(BENCH)

# BENCH=stage,stage,... runs some stages (see bench/bench_full.c)
bench-full: $(BUILD)/bench_full $(BUILD)/make_model
	@mkdir -p $(ZIMAGE_BENCH_MODEL)
	$(BUILD)/make_model $(ZIMAGE_BENCH_MODEL) test/golden/tiny-zimage/tokenizer
	$(BUILD)/bench_full $(ZIMAGE_BENCH_MODEL) $(BENCH)

debug:
	$(MAKE) BUILD=build/debug BINDIR=build/debug OPT="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined" \
	        LDFLAGS="-fsanitize=address,undefined" all build/debug/zitest

# The whole suite with sanitizers: any report fails it (-fno-sanitize-recover), leaks included.
SAN     := -fsanitize=address,undefined -fno-sanitize-recover=undefined
test-asan:
	$(MAKE) BUILD=build/asan BINDIR=build/asan OPT="-O1 -g -fno-omit-frame-pointer $(SAN)" \
	        LDFLAGS="$(SAN)" test

# libFuzzer: every fuzz/NAME.c is a target build/libfuzzer/fuzz-NAME, run for FUZZ_SECONDS from
# its seeds (fuzz/corpus/NAME/, read only; new inputs go to build/libfuzzer/work/NAME/); a
# crashing input is kept in fuzz/crashes/NAME/ and replayed by `make test` from then on.
# Targets that take a path write their input to $TMPDIR: /dev/shm where there is one.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_OPT     := -O1 -g -fno-omit-frame-pointer $(SAN)
FUZZ_NAMES   := $(patsubst fuzz/%.c,%,$(wildcard fuzz/*.c))
fuzz:
	$(MAKE) CC=$(FUZZ_CC) BUILD=build/libfuzzer OPT="$(FUZZ_OPT) -fsanitize=fuzzer-no-link" fuzz-run

fuzz-run: $(FUZZ_NAMES:%=$(BUILD)/fuzz-%)
	@fail=""; tmp=/dev/shm; [ -d $$tmp ] || tmp=/tmp; for t in $(FUZZ_NAMES); do \
	    mkdir -p $(BUILD)/work/$$t fuzz/crashes/$$t; \
	    echo "fuzz $$t: $(FUZZ_SECONDS) s"; \
	    TMPDIR=$$tmp $(BUILD)/fuzz-$$t -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
	        -artifact_prefix=fuzz/crashes/$$t/ $(BUILD)/work/$$t fuzz/corpus/$$t > $(BUILD)/$$t.log 2>&1 \
	        || fail="$$fail $$t"; \
	    grep -E "^(Done|stat::number_of_executed_units|SUMMARY)" $(BUILD)/$$t.log | sed "s/^/  /"; \
	done; \
	if [ -n "$$fail" ]; then echo "fuzz: findings in:$$fail (fuzz/crashes/, logs in $(BUILD)/)"; exit 1; fi

$(BUILD)/fuzz-%: fuzz/%.c fuzz/fuzz.h $(BUILD)/libzimage.a
	$(CC) $(CFLAGS) -DZI_LIBFUZZER -fsanitize=fuzzer $< $(BUILD)/libzimage.a -o $@ $(LDLIBS)

clean:
	rm -rf build $(PROGS)

.PHONY: all test bench bench-full debug test-asan fuzz fuzz-run clean
.SUFFIXES:
.PRECIOUS: $(BUILD)/%.o
-include $(LIBOBJ:.o=.d) $(TESTOBJ:.o=.d) $(PROGS:%=$(BUILD)/%.d) $(BENCHSRC:%.c=$(BUILD)/%.d)
