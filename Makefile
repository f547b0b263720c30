# zimage.c: `make` builds ./sample and ./train; `make test` runs the test suite.
#   make PORTABLE=1   generic binary (no -march=native)
#   make OMP=1        OpenMP instead of the pthread pool
#   make CC=clang     any C11 compiler
#   make debug        ASan + UBSan build in build/debug/
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
TESTSRC := $(wildcard test/*.c)
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

# The runner's last line is "N passed, N failed". TEST=substring runs a subset.
test: all $(BUILD)/zitest
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

clean:
	rm -rf build $(PROGS)

.PHONY: all test bench bench-full debug clean
.SUFFIXES:
.PRECIOUS: $(BUILD)/%.o
-include $(LIBOBJ:.o=.d) $(TESTOBJ:.o=.d) $(PROGS:%=$(BUILD)/%.d) $(BENCHSRC:%.c=$(BUILD)/%.d)
