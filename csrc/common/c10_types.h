// The kernel cores' type traits for c10's element types (include in torch glue before any core).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "common/bfloat16.h"

namespace momoe {
template <>
struct is_bfloat16<c10::BFloat16> : std::true_type {};
}  // namespace momoe
