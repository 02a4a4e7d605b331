// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: a module wearing a trusted name. Built as "ifb", the in-tree
 * driver the test policy trusts, with atk_syscall's code: CTVM must judge it
 * by its code, isolate it, and stop its syscall-table hook.
 */
#include "atk_syscall.c"
