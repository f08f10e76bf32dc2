# Chat-template interpreter targets, buildable on their own: a small library with just
# src/tokenizer/chat_template.cpp (so they need nothing else from ftune_tokenizer), the
# render_template_tool driver, the gtest, and the pytest that compares with transformers.
# Included from tests/tokenizer/CMakeLists.txt.
if(NOT TARGET ftune_chat_template)
  add_library(ftune_chat_template STATIC ${PROJECT_SOURCE_DIR}/src/tokenizer/chat_template.cpp)
  target_link_libraries(ftune_chat_template PUBLIC ftune_core nlohmann_json::nlohmann_json)
endif()

add_executable(render_template_tool ${CMAKE_CURRENT_LIST_DIR}/render_template_tool.cpp)
target_link_libraries(render_template_tool PRIVATE ftune_chat_template)

# tests/tokenizer/CMakeLists.txt may already build the gtest against ftune_tokenizer.
if(NOT TARGET chat_template_test)
  ftune_add_gtest(chat_template_test SOURCES ${CMAKE_CURRENT_LIST_DIR}/chat_template_test.cpp
                  LIBS ftune_chat_template TIMEOUT 60)
endif()

ftune_add_pytest(chat_template_py FILE tests/python/test_chat_template.py TIMEOUT 120)
set_property(TEST chat_template_py APPEND PROPERTY ENVIRONMENT
             "FTUNE_RENDER_TEMPLATE_TOOL=$<TARGET_FILE:render_template_tool>")
