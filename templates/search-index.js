{# The search index as a classic script: pages opened from file:// cannot fetch() JSON. #}
window.ATLAS_SEARCH = {{ search | tojson }};
